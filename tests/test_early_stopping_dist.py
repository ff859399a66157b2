"""Early stopping across real ranks: one decision, broadcast; persisted across an interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distrib.checkpoint.serialization import unflatten_state
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore

from .conftest import launch_ranks

pytestmark = pytest.mark.slow

BASE = ["--no-progress", "--log-level", "info", "--optimizer", "sgd", "--batch-size", "16"]


def _runs(results: list, index: int = 0) -> list[dict]:  # type: ignore[type-arg]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return [r.output["runs"][index] for r in results]


def test_ranks_with_different_local_values_stop_at_the_same_epoch(tmp_path: Path) -> None:
    """Each rank's validation shard gives a different local loss; the reduced value is the same
    everywhere and both ranks leave after the same epoch and step."""
    argv = BASE + ["--task", "tests.tasks:skewed", "--lr", "0.5", "--max-epochs", "30",
                   "--patience", "1", "--checkpoint-dir", str(tmp_path / "ck")]
    runs = _runs(launch_ranks("fit", tmp_path / "out", {"runs": [argv]}))
    assert runs[0]["stop_reason"] == runs[1]["stop_reason"] == "early_stop"
    assert runs[0]["epochs"] == runs[1]["epochs"] < 30
    assert runs[0]["global_step"] == runs[1]["global_step"]
    assert [e["metrics"]["val_loss"] for e in runs[0]["trace"]] == \
        [e["metrics"]["val_loss"] for e in runs[1]["trace"]]


def test_nan_on_one_rank_stops_every_rank_with_the_reason_logged(tmp_path: Path) -> None:
    argv = BASE + ["--task", "tests.tasks:nan_on_rank1", "--task-arg", "after=4", "--lr", "0.1",
                   "--max-epochs", "10", "--checkpoint-dir", str(tmp_path / "ck")]
    results = launch_ranks("fit", tmp_path / "out", {"runs": [argv]})
    runs = _runs(results)
    assert runs[0]["stop_reason"] == runs[1]["stop_reason"] == "early_stop"
    assert runs[0]["epochs"] == runs[1]["epochs"] < 10
    assert "val_loss = nan is not finite" in results[0].stderr
    final = CheckpointStore(LocalStorage(str(tmp_path / "ck"))).latest()
    assert final is not None and final.manifest is not None and final.manifest.meta.final
    assert final.manifest.meta.metric is not None
    assert final.manifest.meta.metric.value is None  # NaN is not JSON


@pytest.mark.parametrize("extra", [
    ["--grad-accum-steps", "3", "--patience", "0", "--monitor-metric", "train_loss", "--mode", "max"],
    ["--grad-accum-steps", "3", "--max-steps", "5"],
], ids=["early-stop-with-leftover-micro-steps", "max-steps-mid-accumulation"])
def test_stopping_with_accumulation_and_uneven_last_batch_does_not_hang(
        tmp_path: Path, extra: list[str]) -> None:
    """250 samples on 2 ranks with batch 16: 8 micro-batches per rank, the last one of 13
    samples, in accumulation groups of 3, 3 and 2."""
    argv = BASE + ["--task", "tests.tasks:tiny", "--task-arg", "train=250", "--lr", "0.1",
                   "--max-epochs", "4", "--checkpoint-dir", str(tmp_path / "ck"), *extra]
    runs = _runs(launch_ranks("fit", tmp_path / "out", {"runs": [argv]}, timeout=120))
    assert runs[0]["global_step"] == runs[1]["global_step"]
    assert runs[0]["stop_reason"] == runs[1]["stop_reason"] != "max_epochs"


def test_interrupted_with_counter_at_two_stops_at_the_same_epoch(tmp_path: Path) -> None:
    """The uninterrupted run's patience counter is 2 after epoch 4; a run that crashes in the
    first step of epoch 5 and is started again resumes with counter 2 and stops after the same
    epoch, with bit-identical weights (dropout included)."""
    argv = BASE + ["--task", "tests.tasks:tiny", "--task-arg", "dropout=0.2", "--lr", "0.3",
                   "--max-epochs", "30", "--monitor-metric", "val_accuracy", "--mode", "max",
                   "--patience", "3", "--no-async-save"]
    straight = _runs(launch_ranks("fit", tmp_path / "a", {
        "runs": [argv + ["--checkpoint-dir", str(tmp_path / "ck-a")]]}))[0]
    waits = [e["wait"] for e in straight["trace"]]
    assert 2 in waits and straight["stop_reason"] == "early_stop"
    epoch_with_two = waits.index(2)  # 0-based index of the epoch after which the counter is 2
    crash_step = straight["trace"][epoch_with_two]["step"] + 1

    ck = str(tmp_path / "ck-b")
    crashed = launch_ranks("fit", tmp_path / "b1", {"runs": [argv + ["--checkpoint-dir", ck]],
                                                     "raise_at": [0, crash_step]})
    assert all(r.returncode != 0 for r in crashed)
    resumed = _runs(launch_ranks("fit", tmp_path / "b2", {
        "runs": [argv + ["--checkpoint-dir", ck]]}))
    for run in resumed:
        assert run["resumed_at"]["wait"] == 2
        assert run["resumed_at"]["epoch"] == epoch_with_two + 1
        assert run["epochs"] == straight["epochs"]
        assert run["global_step"] == straight["global_step"]
        assert run["message"] == straight["message"]
    for rank in (0, 1):
        a = torch.load(tmp_path / "a" / f"run0-rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b2" / f"run0-rank{rank}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_restore_best_weights_in_model_and_final_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    argv = BASE + ["--task", "tests.tasks:tiny", "--lr", "0.3", "--max-epochs", "30",
                   "--monitor-metric", "val_accuracy", "--mode", "max", "--patience", "3",
                   "--restore-best", "--checkpoint-dir", str(ck)]
    results = launch_ranks("fit", tmp_path / "out", {"runs": [argv], "snapshots": True})
    runs = _runs(results)
    best = runs[0]["best_epoch"]  # 1-based, as logged
    assert best < runs[0]["epochs"]  # the best epoch is not the last one
    assert f"weights restored from the best epoch {best}" in results[0].stderr.splitlines()[-1]
    expected = torch.load(tmp_path / "out" / f"run0-epoch{best}-rank0.pt", weights_only=True)
    last = torch.load(tmp_path / "out" / f"run0-epoch{runs[0]['epochs']}-rank0.pt",
                      weights_only=True)
    assert not all(torch.equal(expected[k], last[k]) for k in expected)
    for rank in (0, 1):
        final = torch.load(tmp_path / "out" / f"run0-rank{rank}.pt", weights_only=True)
        assert all(torch.equal(final[k], expected[k]) for k in expected)
    store = CheckpointStore(LocalStorage(str(ck)))
    newest = [i for i in store.scan() if i.status == "valid"][-1]
    assert newest.manifest is not None and newest.manifest.meta.final is True
    loaded = store.read(newest)
    model = unflatten_state(loaded.skeleton, loaded.tensors)["model"]
    assert all(torch.equal(model[k], expected[k]) for k in expected)
