"""The run lease on a checkpoint directory: one job writes there at a time."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distrib import Config, Task, Trainer
from distrib.checkpoint.lease import Lease, LeaseHeld, run_identity
from distrib.checkpoint.storage import LocalStorage, open_storage
from distrib.checkpoint.store import CheckpointError

from .conftest import REPO, base_env, torchrun
from .tasks import tiny


def _holder(storage: LocalStorage, gen: int = 1, **fields: object) -> None:
    content = {"run_id": "other", "host": "elsewhere", "pid": 1, "started": time.time(),
               "heartbeat": time.time(), "timeout": 60.0, **fields}
    storage.write(f"lease-{gen:09d}.json", [json.dumps(content).encode()])


def test_acquire_release_and_generations(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    lease = Lease(storage, "run-a", timeout_s=5)
    lease.acquire()
    assert storage.list("") == ["lease-000000001.json"]
    assert lease.renew()
    lease.release()
    assert storage.list("") == []
    again = Lease(storage, "run-b", timeout_s=5)
    again.acquire()  # released: taken at once
    assert again.generation == 1
    again.release()


def test_same_run_takes_over_at_once(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    _holder(storage, run_id="TORCHELASTIC_RUN_ID=job-7")
    lease = Lease(storage, "TORCHELASTIC_RUN_ID=job-7", timeout_s=60)
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started < 2
    assert lease.generation == 2 and storage.list("") == ["lease-000000002.json"]


def test_stale_and_dead_holders_are_taken_over(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    _holder(storage, heartbeat=time.time() - 120)
    Lease(storage, "me", timeout_s=60).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _holder(storage, gen=5, host=socket.gethostname(), pid=dead.pid)
    lease = Lease(storage, "me-again", timeout_s=60)
    lease.acquire()
    assert lease.generation == 6


def test_a_live_holder_is_refused_with_its_name(tmp_path: Path) -> None:
    """The holder's heartbeat moves while the newcomer waits: LeaseHeld, well before the
    timeout; the message names the holder."""
    storage = LocalStorage(str(tmp_path))
    holder = Lease(storage, "first-run", timeout_s=4)
    holder.acquire()
    holder.start_heartbeat()
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"in use by run first-run \(host "):
            Lease(storage, "second-run", timeout_s=4).acquire()
        assert time.monotonic() - started < 3.5
    finally:
        holder.release()


def test_a_damaged_lease_is_replaced(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    storage.write("lease-000000003.json", [b"[" * 100_000])
    lease = Lease(storage, "me", timeout_s=5)
    lease.acquire()
    assert lease.generation == 4


def test_of_two_racing_takers_one_wins(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    _holder(storage, heartbeat=time.time() - 600)  # stale: everyone may take it
    outcome: list[str] = []
    winners: list[Lease] = []
    barrier = threading.Barrier(4)

    def take(i: int) -> None:
        lease = Lease(storage, f"taker-{i}", timeout_s=2)
        barrier.wait()
        try:
            lease.acquire()
            lease.start_heartbeat()
            winners.append(lease)
            outcome.append("won")
        except LeaseHeld:
            outcome.append("held")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lease in winners:
        lease.release()
    assert sorted(outcome) == ["held", "held", "held", "won"]


def test_a_holder_that_lost_its_lease_stops(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    lease = Lease(storage, "slow", timeout_s=5)
    lease.acquire()
    _holder(storage, gen=2)  # another run took over while this one stalled
    assert lease.renew() is False and lease.lost
    lease.release()
    assert "lease-000000002.json" in storage.list("")  # the new holder's lease is left alone


def test_run_identity_sources() -> None:
    assert run_identity({"DISTRIB_RUN_ID": "uid-1", "TORCHELASTIC_RUN_ID": "x"}) == \
        "DISTRIB_RUN_ID=uid-1"
    assert run_identity({"TORCHELASTIC_RUN_ID": "abc"}) == "TORCHELASTIC_RUN_ID=abc"
    assert run_identity({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "42"}) == \
        "SLURM_JOB_ID=42"
    assert run_identity({}).startswith("process-") and run_identity({}) != run_identity({})


def test_the_trainer_stops_when_another_run_takes_over(tmp_path: Path) -> None:
    """Another run takes the lease mid-epoch (the step waits until the heartbeat has seen it):
    the trainer stops with one error and writes nothing more."""
    ck = tmp_path / "ck"
    config = Config.from_args(["--task", "tests.tasks:tiny", "--task-arg", "train=512",
                               "--max-epochs", "3", "--batch-size", "8", "--no-progress",
                               "--checkpoint-dir", str(ck), "--lease-timeout", "1",
                               "--log-every-steps", "0"])
    storage = open_storage(str(ck))
    seen = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "took over" in record.getMessage():
                seen.set()

    def build(cfg: Config) -> Task:
        task = tiny(cfg)
        calls = [0]

        def forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 20:  # mid-epoch 1: another run takes the lease
                gens = sorted(n for n in storage.list("") if n.startswith("lease-"))
                _holder(storage, gen=int(gens[-1][6:15]) + 1)  # type: ignore[arg-type]
                assert seen.wait(30), "the lease heartbeat never noticed"
            return model(inputs)

        task.forward = forward
        return task

    handler = Seen()
    logging.getLogger("distrib.checkpoint.lease").addHandler(handler)
    try:
        with pytest.raises(CheckpointError, match="another run took over"):
            Trainer(config, task=build).fit()
    finally:
        logging.getLogger("distrib.checkpoint.lease").removeHandler(handler)
    assert not list(ck.glob("step-*"))  # nothing written after the takeover


@pytest.mark.slow
def test_two_jobs_on_one_directory(tmp_path: Path) -> None:
    """Two real torchrun launches with different seeds on one --checkpoint-dir: the second
    exits 2 naming the holder; the first finishes untouched."""
    ck = tmp_path / "ck"
    gate = tmp_path / "gate"
    common = ["--task", "tests.tasks:gated", "--task-arg", f"gate={gate}", "--batch-size", "16",
              "--max-epochs", "1", "--no-progress", "--no-early-stop", "--lease-timeout", "4",
              "--save-every-steps", "100", "--checkpoint-dir", str(ck)]
    env = base_env()
    first = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "-m",
                                      "distrib.train", *common, "--seed", "1"),
                             cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(ck.glob("lease-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "distrib.launch", "--standalone",
                             "--nproc_per_node=2", "-m", "distrib.train", *common,
                             "--seed", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    gate.touch()  # the first run waited at its first step until the second had been refused
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by run TORCHELASTIC_RUN_ID=" in second.stderr, second.stderr
    assert "resumed from" not in first_err + second.stderr
    assert [p.name for p in ck.glob("lease-*")] == []  # released at the end
    assert (ck / "COMPLETE").exists()
