"""Streams (IterableDataset): sharding over ranks and workers, the end-of-epoch agreement, exact
resume (Stateful) and resume by skipping (not Stateful), the data state in checkpoints."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from distrib import Callback, Config, Trainer
from distrib.checkpoint.format import InvalidCheckpoint
from distrib.checkpoint.serialization import flatten_state, unflatten_state
from distrib.checkpoint.storage import LocalStorage
from distrib.train import main as train_main
from distrib.training.data import (
    StreamShard,
    TrainStream,
    checkpointable,
    reader_states,
    stateful_loader,
    stream_steps,
)

from . import tasks
from .ckpt_helpers import assert_same
from .conftest import launch_ranks, run_cli
from .tampering import FALLBACK, NEWEST, Tamper
from .test_resume_e2e import ENV, Job, assert_identical, export, launch

REPO = Path(__file__).resolve().parent.parent
BASE = ["--task", "tests.tasks:stream", "--task-arg", "train=300", "--task-arg", "dropout=0.1",
        "--max-epochs", "2", "--no-early-stop", "--batch-size", "16", "--save-every-steps", "3",
        "--no-progress", "--log-every-steps", "0", "--log-level", "warning"]
SKIPPING = "has no state_dict()/load_state_dict(): resuming by reading its stream again"


class Numbers(IterableDataset[int]):
    """0, 1, ... n-1."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def _rank_batches(length: int, world: int, workers: int, batch: int) -> list[list[list[int]]]:
    """Every rank's batches of ``Numbers(length)``, read the way the trainer reads a stream."""
    return [[b.tolist() for b in DataLoader(StreamShard(Numbers(length), rank, world),
                                            batch_size=batch, num_workers=workers)]
            for rank in range(world)]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (3, 2)])
def test_readers_split_the_stream_disjointly_and_completely(world: int, workers: int) -> None:
    ranks = _rank_batches(101, world, workers, 4)
    seen = sorted(i for batches in ranks for b in batches for i in b)
    assert seen == list(range(101))
    per_worker = max(1, workers)
    for rank, batches in enumerate(ranks):  # reader j = rank x W + worker takes j, j + k, ...
        assert all((i % (world * per_worker)) // per_worker == rank for b in batches for i in b)


@pytest.mark.parametrize("length,world,workers,batch,accum",
                         [(193, 2, 2, 16, 1), (193, 2, 2, 16, 2), (300, 2, 0, 16, 1),
                          (7, 3, 2, 2, 1), (1000, 1, 2, 64, 3), (5, 2, 0, 4, 1)])
def test_steps_per_epoch_counts_the_full_groups_every_rank_has(
        length: int, world: int, workers: int, batch: int, accum: int) -> None:
    counts = [len(b) for b in _rank_batches(length, world, workers, batch)]
    assert stream_steps(length, world=world, workers=workers, batch_size=batch,
                        accum=accum) == min(counts) // accum


def _loader_after(dataset: Any, workers: int, batches: int) -> tuple[Any, list[Any]]:
    """A stateful loader over rank 0 of 1 that has handed out ``batches`` batches."""
    loader = stateful_loader(StreamShard(dataset, 0, 1), batch_size=4, num_workers=workers,
                             generator=torch.Generator().manual_seed(0))
    it, got = iter(loader), []
    for _ in range(batches):
        got.append(next(it))
    return loader, got


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stateful", [True, False])
def test_the_loader_state_round_trips_through_the_checkpoint_format(workers: int,
                                                                    stateful: bool) -> None:
    """torchdata's state (per worker, with the dataset's tensors) holds nothing a checkpoint
    cannot: JSON plus raw tensors, no pickle; loaded back, the stream continues exactly."""
    make = tasks.StatefulStream if stateful else tasks.Stream
    full = [b for b in stateful_loader(StreamShard(make(3, 61), 0, 1), batch_size=4,
                                       num_workers=workers)]
    loader, first = _loader_after(make(3, 61), workers, 5)
    state = checkpointable(loader.state_dict(), "state")  # type: ignore[attr-defined]
    skeleton, tensors = flatten_state({"data": state})
    text = json.dumps(skeleton, allow_nan=False)
    back = unflatten_state(json.loads(text), [t.clone() for t in tensors])["data"]
    assert_same(state, back)
    readers = reader_states(back, workers)
    assert len(readers) == max(1, workers)
    assert all((r["dataset"] is not None) == stateful for r in readers)
    again = stateful_loader(StreamShard(make(3, 61), 0, 1), batch_size=4, num_workers=workers)
    again.load_state_dict(back)  # type: ignore[attr-defined]
    rest = list(again)
    assert len(first) + len(rest) == len(full)
    for a, b in zip(first + rest, full):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_checkpointable_refuses_what_a_checkpoint_cannot_hold() -> None:
    with pytest.raises(TypeError, match=r"bytes at state.dataset.blob"):
        checkpointable({"dataset": {"blob": b"\x00"}}, "state")


def _saved_states(workers: int) -> list[dict[str, Any]]:
    loader, _ = _loader_after(tasks.StatefulStream(3, 61), workers, 3)
    state = checkpointable(loader.state_dict(), "state")  # type: ignore[attr-defined]
    return [{"epoch": 1, "workers": workers, "loader": state}]


def _set(path: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(saved: list[dict[str, Any]]) -> None:
        *keys, last = path.split("/")
        node: Any = saved
        for key in keys:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return edit


_W = "0/loader/_snapshot/_worker_snapshots/worker_1"
MALFORMED: dict[str, tuple[int, Callable[[list[dict[str, Any]]], None]]] = {
    "not a mapping": (0, lambda s: s.__setitem__(0, [1, 2])),
    "another epoch": (0, _set("0/epoch", 0)),
    "worker count": (2, _set("0/workers", 3)),
    "workers as text": (2, _set("0/workers", "2")),
    "loader missing": (0, lambda s: s[0].pop("loader")),
    "seen negative": (0, _set("0/loader/dataset_state/seen", -1)),
    "seen not a number": (2, _set(f"{_W}/dataset_state/seen", "7")),
    "dataset state keys": (2, _set(f"{_W}/dataset_state/dataset", {"pos": 3})),
    "dataset state gone": (0, _set("0/loader/dataset_state/dataset", None)),
    "last worker out of range": (2, _set("0/loader/_snapshot/_last_yielded_worker_id", 5)),
    "worker mislabelled": (2, _set(f"{_W}/worker_id", 0)),
    "batches since the snapshot": (2, _set("0/loader/_steps_since_snapshot", 10**12)),
    "seed as a float": (2, _set("0/loader/_snapshot/_main_snapshot/_base_seed", 1.5)),
    "fetcher flag": (0, _set("0/loader/fetcher_state/fetcher_ended", "no")),
    "one rank without": (0, lambda s: s.append(None)),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_data_state_is_an_invalid_checkpoint(name: str) -> None:
    workers, edit = MALFORMED[name]
    stream = TrainStream(tasks.StatefulStream(3, 61), rank=0, world=1, workers=workers,
                         batch_size=4, accum=1)
    saved = _saved_states(workers)
    stream.check(saved, epoch=1)  # the untouched one is fine
    edit(saved)
    with pytest.raises(InvalidCheckpoint):
        stream.check(saved, epoch=1)


class StartedAt(Callback):
    def __init__(self) -> None:
        self.step = -1

    def on_fit_start(self, trainer: Trainer) -> None:
        self.step = trainer.global_step


class Fail(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


def _data_of(state: dict[str, Any]) -> dict[str, Any]:
    return state["skeleton"]["per_rank"][0]["data"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("tamper", ["seen", "last worker", "workers"])
def test_a_checkpoint_with_a_malformed_data_state_is_skipped(tamper: str, tmp_path: Path) -> None:
    """The newest checkpoint's data state is edited (with consistent checksums): resume skips
    it, falls back to the older one, replays, and ends bit-identical to an unbroken run."""
    argv = BASE + ["--num-workers", "2", "--save-every-steps", str(FALLBACK), "--max-steps",
                   str(NEWEST + 3)]
    ck = tmp_path / "ck"
    with pytest.raises(RuntimeError, match="injected"):
        Trainer(Config.from_args(argv + ["--checkpoint-dir", str(ck)]),
                callbacks=[Fail(NEWEST + 1)]).fit()
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        "seen": lambda d: d["loader"]["_snapshot"]["_worker_snapshots"]["worker_0"]
        ["dataset_state"].__setitem__("seen", "many"),
        "last worker": lambda d: d["loader"]["_snapshot"].__setitem__("_last_yielded_worker_id",
                                                                      9),
        "workers": lambda d: d.__setitem__("workers", 5),
    }
    Tamper(LocalStorage(str(ck)), outside="").edit_state(lambda s: edits[tamper](_data_of(s)))
    started = StartedAt()
    resumed = Trainer(Config.from_args(argv + ["--checkpoint-dir", str(ck)]),
                      callbacks=[started]).fit()
    assert started.step == FALLBACK
    straight = Trainer(Config.from_args(argv + ["--checkpoint-dir", str(tmp_path / "ref")])).fit()
    assert resumed.model is not None and straight.model is not None
    assert_identical(straight.model.state_dict(), resumed.model.state_dict())


@pytest.mark.parametrize("args,ok", [
    (["--scheduler", "cosine"], False),
    (["--scheduler", "warmup-cosine"], False),
    (["--scheduler", "step", "--max-steps", "10"], False),
    (["--scheduler", "cosine", "--max-steps", "10"], True),
    (["--scheduler", "cosine", "--task-arg", "sized=1"], True),
    (["--scheduler", "step", "--task-arg", "sized=1"], True),
    (["--scheduler", "plateau"], True),
])
def test_a_schedule_that_needs_the_epoch_length(args: list[str], ok: bool, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A stream without __len__ has no known epoch length: a schedule that needs it fails
    before any process group exists, with one line naming what to add."""
    code = train_main(["--task", "tests.tasks:stream", "--checkpoint-dir", str(tmp_path / "ck"),
                       "--check-config", *args])
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
        return
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "--max-steps" in err and "stream" in err


# ==================================================================== real processes


def _metrics(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Losses and metrics of every epoch (not the throughput)."""
    return [{k: v for k, v in h.items() if k != "samples_per_s"} for h in history]


def _interrupted(tmp_path: Path, cases: list[list[str]], world: int, raise_at: int,
                 **extra: Any) -> tuple[list[dict[str, Any]], str]:
    results = launch_ranks("interrupted", tmp_path / "out",
                           {"cases": cases, "raise_at": raise_at, **extra}, world_size=world,
                           timeout=240)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results[0].output["cases"], results[0].stderr


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_interrupted_stream_resumes_bit_identical(world: int, tmp_path: Path) -> None:
    """A run that fails mid-epoch (after a --save-every-steps checkpoint) and is fitted again
    ends with the weights of an uninterrupted run: Stateful streams exactly, other streams by
    reading again what was consumed (with the warning), with 0 and 2 workers per rank, and
    with accumulation groups."""
    kinds = [(1, 0), (1, 2), (0, 0), (0, 2)] if world == 2 else [(1, 2), (0, 0)]
    cases = [BASE + ["--task-arg", f"stateful={s}", "--num-workers", str(w)] for s, w in kinds]
    # 577 items: with 2 ranks, rank 0 has a batch more, and its last group is partial
    cases.append(BASE + ["--num-workers", "2", "--grad-accum-steps", "2", "--task-arg",
                         "train=577"])
    out, stderr = _interrupted(tmp_path, cases, world, 17)
    for case, argv in zip(out, cases):
        assert case["raised"], argv
        assert case["resumed_at"]["step"] == 15  # the last checkpoint, mid-epoch
        assert case["steps"][0] == case["steps"][1]
        assert _metrics(case["history"][0]) == _metrics(case["history"][1])
        assert case["identical"], argv
    assert stderr.count(SKIPPING) == sum(1 for s, _ in kinds if not s)


@pytest.mark.slow
def test_resume_with_other_worker_count_restarts_at_the_least_advanced_reader(
        tmp_path: Path) -> None:
    case = BASE + ["--num-workers", "2", "--task-arg", "stateful=0"]
    out, stderr = _interrupted(tmp_path, [case], 2, 17, resume_extra=["--num-workers", "0"])
    assert out[0]["raised"] and out[0]["resumed_at"]["step"] == 15
    assert "resuming a stream saved by 2 rank(s) x 2 reader(s) with 2 x 1" in stderr
    assert "no longer bit-identical" in stderr
    assert out[0]["steps"][1] >= out[0]["steps"][0]  # nothing skipped: at least as many steps


@pytest.mark.slow
def test_resume_with_fewer_ranks(tmp_path: Path) -> None:
    """2 ranks fail mid-epoch; 1 rank resumes from the checkpoint and finishes the run."""
    argv = BASE + ["--num-workers", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    crashed = launch_ranks("fit", tmp_path / "a", {"runs": [argv], "raise_at": [None, 17]})
    assert all(r.returncode != 0 for r in crashed)
    one = launch_ranks("fit", tmp_path / "b", {"runs": [argv]}, world_size=1)
    assert one[0].returncode == 0, one[0].stderr[-3000:]
    assert one[0].output["runs"][0]["resumed_at"]["step"] == 15
    assert "resuming a stream saved by 2 rank(s) x 2 reader(s) with 1 x 2" in one[0].stderr


@pytest.mark.slow
def test_uneven_streams_end_the_epoch_together_and_metrics_are_exact(tmp_path: Path) -> None:
    """193 items over 2 ranks x 2 workers: reader 0 has one item more, so rank 0 has one batch
    more than rank 1. Without agreeing, rank 0 would wait alone in DDP's all-reduce; instead
    the epoch ends for both (with accumulation, the partial group is dropped), and the
    validation stream (101 items, uneven too) is reduced exactly."""
    runs = [BASE + ["--num-workers", "2", "--task-arg", "train=193", "--task-arg", "sized=1",
                    "--grad-accum-steps", str(accum), "--checkpoint-dir", str(tmp_path / f"ck{accum}")]
            for accum in (1, 2)]
    started = time.monotonic()
    results = launch_ranks("fit", tmp_path / "out", {"runs": runs}, timeout=120)
    assert time.monotonic() - started < 120
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    for i, accum in enumerate((1, 2)):
        per_rank = [r.output["runs"][i] for r in results]
        assert _metrics(per_rank[0]["history"]) == _metrics(per_rank[1]["history"])
        expected = stream_steps(193, world=2, workers=2, batch_size=16, accum=accum)
        assert expected == (6 if accum == 1 else 3)
        assert per_rank[0]["global_step"] == 2 * expected
        # the last evaluation ran on the final weights: compare with one process on all of it
        config = Config.from_args(runs[i])
        task = tasks.stream(config)
        task.model.load_state_dict(torch.load(tmp_path / "out" / f"run{i}-rank0.pt",
                                              weights_only=True))
        task.model.eval()
        xs, ys = zip(*task.val_dataset)  # type: ignore[arg-type]
        with torch.no_grad():
            out = task.model(torch.stack(xs))
        y = torch.stack(ys)
        last = per_rank[0]["history"][-1]
        assert last["val_loss"] == pytest.approx(float(task.loss_fn(out, y)), rel=1e-6)
        assert last["val_accuracy"] == pytest.approx(
            float(tasks.accuracy(out, y).double().mean()), rel=1e-12)


@pytest.mark.slow
def test_sigterm_with_two_workers_emergency_checkpoint_and_exact_relaunch(tmp_path: Path) -> None:
    """SIGTERM to distrib.launch while 2 ranks x 2 workers read a Stateful stream: exit 75, an
    emergency checkpoint, and a relaunch that loses no step and ends bit-identical."""
    job = ["--task", "tests.tasks:stream", "--task-arg", "train=6000", "--task-arg",
           "dropout=0.1", "--max-epochs", "2", "--no-early-stop", "--batch-size", "16",
           "--save-every-steps", "50", "--no-progress", "--log-every-steps", "0",
           "--num-workers", "2"]
    ref = run_cli(launch(tmp_path / "ref", "--standalone", "--nproc_per_node=2", job=job),
                  cwd=REPO, env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = launch(tmp_path / "ck", "--standalone", "--nproc_per_node=2",
                 launcher="distrib.launch", job=job)
    first = Job(cmd, tmp_path / "log1")
    first.wait_started()
    time.sleep(1.0)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.text()[-3000:]
    found = re.search(r"emergency checkpoint at step (\d+)", first.text())
    assert found, first.text()[-3000:]
    step = int(found.group(1))
    assert 0 < step < 376  # mid-run (188 steps per epoch)
    again = Job(cmd, tmp_path / "log2")
    assert again.finish() == 0, again.text()[-3000:]
    assert f"step {step}" in again.text() and "no steps are lost" in again.text()
    assert_identical(export(tmp_path / "ref", tmp_path / "ref.pt"),
                     export(tmp_path / "ck", tmp_path / "model.pt"))

