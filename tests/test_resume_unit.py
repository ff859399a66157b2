"""Resume options, the preemption flag and the launcher, in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distrib import Config, Trainer
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointError, CheckpointStore
from distrib.launch import split_args, worker_code
from distrib.runtime.preemption import PreemptionHandler, shutdown_budget_problems, torchrun_env_problem

from .conftest import REPO, base_env

TINY = ["--task", "tests.tasks:tiny", "--no-progress", "--log-level", "warning",
        "--no-early-stop"]


def test_resume_from_an_explicit_checkpoint_url(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(Config.from_args(TINY + ["--max-epochs", "2", "--checkpoint-dir", str(a)])).fit()
    first = CheckpointStore(LocalStorage(str(a))).scan()[0]  # the epoch-1 checkpoint
    result = Trainer(Config.from_args(TINY + ["--max-epochs", "3", "--checkpoint-dir", str(b),
                                              "--resume", f"{a}/{first.name}"])).fit()
    assert result.epochs == 3 and len(result.history) == 3  # history came from the checkpoint
    assert [i.step for i in CheckpointStore(LocalStorage(str(b))).scan()] == [8, 12]


def test_resume_from_a_damaged_explicit_checkpoint_is_an_error(tmp_path: Path) -> None:
    a = tmp_path / "a"
    Trainer(Config.from_args(TINY + ["--max-epochs", "1", "--checkpoint-dir", str(a)])).fit()
    step = CheckpointStore(LocalStorage(str(a))).scan()[0].name
    (a / step / "manifest.json").write_text("{")
    config = Config.from_args(TINY + ["--checkpoint-dir", str(tmp_path / "b"), "--resume",
                                      f"{a}/{step}"])
    with pytest.raises(CheckpointError, match="manifest: not valid JSON"):
        Trainer(config).fit()


def test_handler_only_sets_a_flag_and_restores_the_previous_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_timeout_ordering_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("DISTRIB_GRACE_PERIOD_SECONDS", "20")
    assert "not below the pod's grace period" in shutdown_budget_problems(None)[0]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "10")
    assert shutdown_budget_problems(None) == []
    assert "emergency checkpoint takes about 8.0s" in shutdown_budget_problems(8.0)[0]
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert "135712" in (torchrun_env_problem() or "")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert torchrun_env_problem() is None


@pytest.mark.parametrize("argv, torchrun, script", [
    (["--nproc_per_node=2", "-m", "distrib.train", "--lr", "0.1"],
     ["--nproc_per_node=2", "-m", "distrib.train"], ["--lr", "0.1"]),
    (["--nnodes", "2", "--standalone", "train.py", "--x"],
     ["--nnodes", "2", "--standalone", "train.py"], ["--x"]),
])
def test_launcher_splits_torchrun_and_script_arguments(argv: list[str], torchrun: list[str],
                                                       script: list[str]) -> None:
    assert split_args(argv) == (torchrun, script)


def test_launcher_prefers_permanent_then_preempted(tmp_path: Path) -> None:
    (tmp_path / "rank-0").write_text("75")
    (tmp_path / "rank-1").write_text("1")
    assert worker_code(str(tmp_path)) == 75
    (tmp_path / "rank-2").write_text("2")
    assert worker_code(str(tmp_path)) == 2


def test_launcher_rejects_bad_arguments_before_starting_torchrun(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "distrib.launch", "--nproc_per_node=2", "-m",
                           "distrib.train", "--optimizer", "lion"], cwd=tmp_path,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice: 'lion'" in proc.stderr
    assert "torch.distributed.run" not in proc.stderr  # torchrun was never started
    assert str(REPO) not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("context", ["distrib", "plain"])
def test_a_notice_in_a_new_workers_first_moments(context: str) -> None:
    """A SIGTERM to the rank's process group that lands after a data-loader worker was forked
    and before its worker_init_fn detached it (validation loaders fork new workers at every
    evaluation): with distrib's worker context the worker starts with the signal blocked and
    drops it; the rank gets the notice and the loader reads everything. Started the plain way,
    the worker dies (what the test shows would happen without it)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "signal_window.py")] +
                         ([] if context == "distrib" else ["plain"]), cwd=REPO, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["notice"] is True
    if context == "distrib":
        assert report == {"items": 64, "notice": True}, out.stderr[-2000:]
    else:  # the worker died of the SIGTERM; torch says so one of two ways, depending on whether
        # its SIGCHLD check or the failed read from the dead worker notices first
        assert "DataLoader worker" in report["error"], report
        assert ("exited unexpectedly" in report["error"]
                or "is killed by signal: Terminated" in report["error"]), report


@pytest.mark.slow
@pytest.mark.parametrize("context", ["distrib", "plain"])
def test_a_worker_deadlocked_in_fork_is_started_again(context: str) -> None:
    """A data-loader worker that never gets out of ``os.fork()`` (CPython before 3.12 can
    deadlock there when another thread of the rank starts or ends at that moment; seen as a
    300 s hang in CI): distrib's worker context kills it after its start timeout and forks it
    again, and the loader reads everything. Started the plain way, the loader waits for that
    worker until its own timeout (forever without one)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "fork_deadlock.py")] +
                         ([] if context == "distrib" else ["plain"]), cwd=REPO, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if context == "distrib":
        assert report == {"items": 64}, out.stderr[-2000:]
        assert "did not start within 1s" in out.stderr
    else:
        assert "timed out" in report["error"]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["running", "early"])
def test_data_loader_workers_die_with_their_rank(moment: str) -> None:
    """A rank SIGKILLed with two data-loader workers: distrib's workers are killed by the kernel
    with it. A forked worker holds copies of the rank's gloo sockets, so the other ranks learn of
    the death only when the last worker is gone: torchrun restarted such a group 9.0 s after the
    kill instead of 3.8 s. Torch's own workers end by themselves once its watchdog notices the
    orphan ("exit 0", after up to 5 s; under pytest-xdist they were not seen to end at all).

    ``early``: the rank dies before its workers have run their ``worker_init_fn``. When the
    workers read their parent's PID only there, they took init (or a subreaper) for their rank
    and ran on for good (seen as a streaming example's worker still alive after its test)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "orphan_workers.py")]
                         + (["early"] if moment == "early" else []), cwd=REPO,
                         env=base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["signal 9", "signal 9"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_started_another_way_keep_running(method: str) -> None:
    """The trainer's worker init with the start methods that do not fork from the rank (a fork
    server, spawn): the worker must not take its fork server for a dead rank and leave."""
    import torch
    from torch.utils.data import DataLoader

    from distrib.training.trainer import _worker_init

    loader = DataLoader(torch.arange(64), batch_size=8, num_workers=2, worker_init_fn=_worker_init,
                        multiprocessing_context=method)
    assert sum(len(batch) for batch in loader) == 64
