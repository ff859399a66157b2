"""Correctness of DDP training across real processes (gloo, 2 ranks)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from distrib import Config, Trainer

from .conftest import launch_ranks

pytestmark = pytest.mark.slow

TINY = ["--task", "tests.tasks:tiny", "--no-progress", "--log-level", "warning",
        "--save-every-epochs", "0", "--optimizer", "sgd", "--lr", "0.1", "--max-epochs", "2",
        "--no-early-stop", "--task-arg", "train=256"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tol, rtol=0), (key, (a[key] - b[key]).abs().max())


def test_ddp_matches_single_process_and_accumulation_skips_sync(tmp_path: Path) -> None:
    """2 ranks x batch B == 1 rank x batch 2B; accumulation (2 x B/2) gives the same weights and
    performs exactly one gradient all-reduce per optimizer step (no_sync on the other micro-step)."""
    ck = tmp_path / "ck"
    single = Trainer(Config.from_args(
        TINY + ["--batch-size", "32", "--checkpoint-dir", str(ck / "single")])).fit()
    assert single.model is not None
    reference = {k: v.detach().clone() for k, v in single.model.state_dict().items()}

    runs = [TINY + ["--batch-size", "16", "--checkpoint-dir", str(ck / "ddp")],
            TINY + ["--batch-size", "8", "--grad-accum-steps", "2",
                    "--checkpoint-dir", str(ck / "accum")],
            TINY + ["--batch-size", "16", "--checkpoint-dir", str(ck / "ddp-again")]]
    results = launch_ranks("fit", tmp_path / "out", {"runs": runs, "comm_hook": True})
    for r in results:
        assert r.returncode == 0, r.stderr
    steps = single.global_step
    assert steps == 2 * 256 // 32
    for rank in (0, 1):
        for run in (0, 1):
            _assert_close(_weights(tmp_path / "out" / f"run{run}-rank{rank}.pt"), reference, 1e-5)
    # the gradient all-reduce count per optimizer step is the same with and without accumulation
    plain = results[0].output["runs"][0]["hook_at_step"]
    accum = results[0].output["runs"][1]["hook_at_step"]
    per_step = plain[0]
    assert per_step >= 1 and len(plain) == len(accum) == steps
    assert plain == accum == [per_step * (i + 1) for i in range(steps)]


def test_validation_is_exact_on_uneven_set(tmp_path: Path) -> None:
    """101 validation samples on 2 ranks: the reduced value equals one process on all 101, while
    a padded DistributedSampler-style evaluation would not."""
    argv = ["--task", "tests.tasks:tiny", "--task-arg", "val=101", "--checkpoint-dir",
            str(tmp_path / "ck")]
    results = launch_ranks("exact_eval", tmp_path / "out", {"argv": argv})
    for r in results:
        assert r.returncode == 0, r.stderr
        out = r.output
        assert out["got"]["val_loss"] == pytest.approx(out["expected"]["val_loss"], rel=1e-6)
        assert out["got"]["val_accuracy"] == pytest.approx(out["expected"]["val_accuracy"],
                                                           rel=1e-9)
        assert abs(out["naive_val_loss"] - out["expected"]["val_loss"]) > 1e-6
    assert sorted(r.output["local_count"] for r in results) == [50, 51]


def test_plateau_scheduler_steps_on_the_reduced_metric(tmp_path: Path) -> None:
    """Rank shards of the validation set differ, yet both ranks change the LR at the same epochs,
    exactly as ReduceLROnPlateau fed with the globally reduced val_loss would."""
    argv = ["--task", "tests.tasks:skewed", "--no-progress", "--log-level", "warning",
            "--checkpoint-dir", str(tmp_path / "ck"), "--max-epochs", "8", "--no-early-stop",
            "--scheduler", "plateau", "--plateau-patience", "0", "--plateau-factor", "0.5",
            "--lr", "0.5", "--optimizer", "sgd", "--save-every-epochs", "0"]
    results = launch_ranks("fit", tmp_path / "out", {"runs": [argv]})
    traces = []
    for r in results:
        assert r.returncode == 0, r.stderr
        traces.append(r.output["runs"][0]["trace"])
    lrs = [[e["lr"] for e in t] for t in traces]
    assert lrs[0] == lrs[1]
    # replay the reduced metric through a fresh ReduceLROnPlateau
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    expected = []
    for epoch in traces[0]:
        sched.step(epoch["metrics"]["val_loss"])
        expected.append(opt.param_groups[0]["lr"])
    assert lrs[0] == expected
    assert min(expected) < 0.5  # the schedule did act


def test_exception_on_one_rank_fails_the_job_without_hanging(tmp_path: Path) -> None:
    """Rank 1 raises at step 3; both ranks exit non-zero well before the collective timeout,
    and neither leaves its process group behind."""
    argv = TINY + ["--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ck"),
                   "--dist-timeout", "120"]
    started = time.monotonic()
    results = launch_ranks("fit", tmp_path / "out", {"runs": [argv], "raise_at": [1, 3]},
                           timeout=100)
    assert time.monotonic() - started < 100
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    assert "injected failure on rank 1" in results[1].stderr


def test_process_group_is_destroyed_after_fit(tmp_path: Path) -> None:
    """When the trainer creates the group it also destroys it; when the caller created it, it is
    left alone (the 'fit' worker creates its own group first)."""
    argv = TINY + ["--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ck")]
    results = launch_ranks("fit", tmp_path / "out", {"runs": [argv]})
    for r in results:
        assert r.returncode == 0, r.stderr
        assert r.output["group_alive_after_fit"] is True


def test_lagged_agreement_spaces_exchanges_and_every_rank_acts_at_the_same_call(
        tmp_path: Path) -> None:
    """Rank 1 raises a flag at call 30 of 80; steps take 2 ms on rank 0 and 6 ms on rank 1 and
    exchanges aim at 40 ms apart. Both ranks see the flag at the same call, at most two intervals
    later, and tune the same interval (several calls, not every call)."""
    args = {"target": 0.04, "sleep": [0.002, 0.006], "calls": 80, "raise_rank": 1, "raise_at": 30}
    results = launch_ranks("agreement", tmp_path / "out", args)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    zero, one = (r.output for r in results)
    assert zero == one  # same due calls, same intervals, same agreed flags at the same call
    (call, agreed), *rest = zero["seen"]
    assert agreed == [False, True] and rest == [["drain", [False, False]]]
    interval = max(zero["intervals"])
    assert 2 <= interval <= 20, zero["intervals"]  # ~40 ms / ~4-6 ms per call
    assert 30 < call <= 30 + 2 * interval


def _fit_loop(tmp_path: Path, runs: int, prewarm: bool) -> None:
    servers = [TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False) for _ in range(runs)]
    results = launch_ranks("fit_loop", tmp_path, {"ports": [s.port for s in servers],
                                                  "prewarm": prewarm}, timeout=600)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "terminate called" not in r.stderr, r.stderr[-3000:]
        assert r.output is not None and r.output["codes"] == [0] * runs, r.stderr[-3000:]


def test_the_group_does_not_outlive_fit(tmp_path: Path) -> None:
    """Issue 12 item 13, the cause: ``torch.distributed.nn.functional``, imported lazily by DDP
    once the group exists, kept the group in default arguments, so after ``fit()`` its gloo
    threads lived on into interpreter finalization, where one could abort the process
    ("terminate called without an active exception"). Fresh processes, nothing pre-imported:
    after ``fit()`` the group must be gone (collected), and the exit clean."""
    _fit_loop(tmp_path, runs=1, prewarm=False)


def test_fifty_api_fits_exit_cleanly(tmp_path: Path) -> None:
    """Issue 12 item 13, the proof: 50 two-rank ``Trainer.fit()`` runs through the Python API,
    each rank a process that exits normally afterwards: no abort, no group left behind."""
    _fit_loop(tmp_path, runs=50, prewarm=True)
