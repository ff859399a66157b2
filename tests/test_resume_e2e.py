"""Failure scenarios under real torchrun, 2 ranks on CPU. Each one ends with weights exported by
``python -m distrib.ckpt export`` that must be bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import JOB_ENV, REPO, LoggedJob, chaos, free_port, run_cli, wait_listening

pytestmark = pytest.mark.slow


TRAIN = 9600  # samples: 300 optimizer steps per epoch with 2 ranks x 16 (kills come after step 50)
STEPS = TRAIN // 32


def job_args(train: int = TRAIN, epochs: int = 2) -> list[str]:
    return ["--task", "tests.tasks:tiny", "--task-arg", f"train={train}", "--task-arg",
            "dropout=0.1", "--max-epochs", str(epochs), "--no-early-stop", "--batch-size", "16",
            "--save-every-steps", "50", "--no-progress", "--log-every-steps", "0"]


JOB = job_args()
ENV = JOB_ENV


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def launch(ckpt: Path, *torchrun_args: str, job: list[str] = JOB,
           launcher: str = "torch.distributed.run") -> list[str]:
    return [sys.executable, "-m", launcher, *torchrun_args, "-m", "distrib.train", *job,
            "--checkpoint-dir", str(ckpt)]


Job = LoggedJob


def export(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """``distrib.ckpt export`` (in this process: the command's own code, without a second
    torch import) and the exported tensors."""
    chaos.export(ckpt, out)
    return torch.load(out, weights_only=True)  # type: ignore[no-any-return]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"not bit-identical: {differ}"


def rank_pid(job: Job, rank: int) -> int:
    """The PID of the worker process with this RANK under a launcher."""
    for pid in chaos.workers(job.proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("reference")
    proc = run_cli(launch(work / "ck", "--standalone", "--nproc_per_node=2"), cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return export(work / "ck", work / "model.pt")


def test_worker_sigkilled_mid_epoch_group_restarts_and_resumes(
        reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Scenario 1, with data-loader worker processes (their seeds derive from seed, epoch, rank)."""
    job = Job(launch(tmp_path / "ck", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
                     job=JOB + ["--num-workers", "1"]), tmp_path / "log")
    job.wait_checkpoint(tmp_path / "ck", 50)  # mid-epoch
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    assert job.finish() == 0, job.text()[-3000:]
    text = job.text()
    assert text.count(chaos.FIRST_STEP) == 2  # the group was restarted once
    resumed = re.search(r"resumed from .*step-(\d+): epoch 1, step (\d+)", text)
    assert resumed and 0 < int(resumed.group(2)) < STEPS  # mid-epoch
    assert_identical(reference, export(tmp_path / "ck", tmp_path / "model.pt"))


def test_writer_sigkilled_during_async_save_leaves_it_invisible(tmp_path: Path) -> None:
    """Scenario 2: rank 0 (the writer) dies while a checkpoint is half on disk; the restarted
    group resumes from the previous one. A larger model makes a save take long enough to hit."""
    job_args = ["--task", "tests.tasks:tiny", "--task-arg", "train=4000", "--task-arg",
                "width=768", "--task-arg", "depth=3", "--max-epochs", "2", "--no-early-stop",
                "--batch-size", "16", "--save-every-steps", "20", "--shard-size-mb", "0.5",
                "--no-progress", "--log-every-steps", "0"]
    ref = run_cli(launch(tmp_path / "ref", "--standalone", "--nproc_per_node=2", job=job_args),
                  cwd=REPO, env=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ckpt = tmp_path / "ck"
    job = Job(launch(ckpt, "--standalone", "--nproc_per_node=2", "--max-restarts=3",
                     job=job_args), tmp_path / "log")
    job.wait_started()
    deadline, staged = time.monotonic() + 60, []
    while not staged:  # a save in progress, after at least one committed checkpoint
        assert time.monotonic() < deadline and job.proc.poll() is None, "never saw a save"
        committed = list(ckpt.glob("step-*/manifest.json")) if ckpt.exists() else []
        staged = [p.name for p in ckpt.glob(".step-*.tmp-*")] if committed else []
    os.kill(rank_pid(job, 0), signal.SIGKILL)
    killed_step = int(staged[0].split("-")[1].split(".")[0])
    assert job.finish() == 0, job.text()[-3000:]
    resumed = re.search(r"resumed from .*step-(\d+)", job.text())
    assert resumed and int(resumed.group(1)) < killed_step
    assert_identical(export(tmp_path / "ref", tmp_path / "ref.pt"),
                     export(ckpt, tmp_path / "model.pt"))


def test_sigterm_emergency_checkpoint_exit_code_relaunch_and_completion(
        reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Scenario 3 (SIGTERM, what Kubernetes sends, to the launcher that wraps torchrun), with two
    data-loader workers per rank (torchrun signals each rank's whole process group), and
    scenario 6 (a relaunch after completion exits 0 at once)."""
    cmd = launch(tmp_path / "ck", "--standalone", "--nproc_per_node=2",
                 launcher="distrib.launch", job=JOB + ["--num-workers", "2"])
    job = Job(cmd, tmp_path / "log1")
    job.wait_checkpoint(tmp_path / "ck", 50)
    os.kill(job.proc.pid, signal.SIGTERM)
    assert job.finish() == 75, job.text()[-3000:]
    text = job.text()
    step = int(re.search(r"emergency checkpoint at step (\d+)", text).group(1))  # type: ignore[union-attr]
    assert "emergency checkpoint committed" in text
    assert (tmp_path / "ck" / f"step-{step:09d}" / "manifest.json").exists()

    again = Job(cmd, tmp_path / "log2")
    assert again.finish() == 0, again.text()[-3000:]
    assert f"step {step}" in again.text() and "no steps are lost" in again.text()
    assert_identical(reference, export(tmp_path / "ck", tmp_path / "model.pt"))

    started = time.monotonic()
    done = Job(cmd, tmp_path / "log3")
    assert done.finish() == 0 and "run already complete" in done.text()
    assert time.monotonic() - started < 60


def test_node_failure_agent_killed_and_started_again(reference: dict[str, torch.Tensor],
                                                     tmp_path: Path) -> None:
    """Scenario 4: two torchrun agents (two "nodes", one worker each) with c10d rendezvous; one
    agent and its worker are SIGKILLed, then the agent is started again, as Kubernetes restarts a
    pod. The surviving agent re-forms the group with it and the job completes."""
    port = free_port()
    agent = launch(tmp_path / "ck", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=node-failure",
                   "--max-restarts=3")
    host = Job(agent, tmp_path / "host.log")  # started first: it hosts the rendezvous store
    wait_listening(port, host)
    other = Job(agent, tmp_path / "other.log")
    host.wait_checkpoint(tmp_path / "ck", 50)
    for pid in [other.proc.pid, *chaos.descendants(other.proc.pid)]:  # a node is gone: the
        os.kill(pid, signal.SIGKILL)  # agent and its worker (which torchrun puts in its own
    other.proc.wait()                 # process group, so killpg would miss it)
    time.sleep(1.0)
    replacement = Job(agent, tmp_path / "replacement.log")
    assert host.finish() == 0, host.text()[-3000:]
    assert replacement.finish() == 0, replacement.text()[-3000:]
    assert "resumed from" in host.text() + replacement.text()
    assert_identical(reference, export(tmp_path / "ck", tmp_path / "model.pt"))


def test_resume_with_a_different_world_size(tmp_path: Path) -> None:
    """2 ranks preempted mid-epoch by SIGUSR1 sent to every process of the job, as SLURM does
    (data-loader workers included), resumed with 1 rank: the epoch's remaining samples are all
    seen (and no more), and the log warns that bit-exactness is gone."""
    ckpt = tmp_path / "ck"
    job = Job(launch(ckpt, "--standalone", "--nproc_per_node=2", launcher="distrib.launch",
                     job=JOB + ["--num-workers", "2"]), tmp_path / "log1")
    job.wait_checkpoint(ckpt, 50)
    for pid in [job.proc.pid, *chaos.descendants(job.proc.pid)]:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    assert job.finish() == 75, job.text()[-3000:]
    step = int(re.search(r"emergency checkpoint at step (\d+)", job.text()).group(1))  # type: ignore[union-attr]
    one = Job(launch(ckpt, "--standalone", "--nproc_per_node=1"), tmp_path / "log2")
    assert one.finish() == 0, one.text()[-3000:]
    text = one.text()
    assert "no longer bit-identical" in text
    epoch, into = divmod(step, STEPS)  # 2 ranks x 16 samples per step
    remaining = math.ceil((TRAIN - into * 32) / 16)  # 1 rank x 16
    later = (2 - epoch - 1) * math.ceil(TRAIN / 16)
    finished = re.search(r"training finished after 2 epochs, (\d+) steps", text)
    assert finished and int(finished.group(1)) == step + remaining + later


def test_chaos_script_with_five_kills(tmp_path: Path) -> None:
    """Scenario 5: launch/chaos.py kills random workers at random times and compares."""
    out = tmp_path / "result.json"
    # 4 epochs of 625 steps: long enough for 5 kills however fast this machine runs it
    job = job_args(train=20000, epochs=4)
    proc = run_cli([sys.executable, str(REPO / "launch" / "chaos.py"), "--kills", "5",
                    "--seed", "1", "--max-delay", "1.0",  # 5 kills within the job's ~12 s of
                    # training, however fast this machine runs it (2 s each did not always fit)
                    "--workdir", str(tmp_path / "work"), "--json", str(out),
                    "--", *job], cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["identical"] is True and result["kills"] == 5
    assert "PASS" in proc.stdout
    assert f"[chaos] + {sys.executable} -m torch.distributed.run --standalone" in proc.stdout
