"""Shared fixtures: launching real multi-process jobs (gloo) and torchrun."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKERS = REPO / "tests" / "workers.py"


def _load_chaos() -> Any:
    """launch/chaos.py (a script, not a package module): its process helpers for the tests."""
    spec = importlib.util.spec_from_file_location("chaos", REPO / "launch" / "chaos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def free_port() -> int:
    """A loopback TCP port for a server a test starts, never handed out twice in one session.

    Not ``bind(0)``-and-close: the kernel hands such a port out again to anything asking for an
    ephemeral one (an outgoing connection, another test's server), and a server started a
    moment later then fails with "address in use". These come from below the kernel's
    ephemeral range (32768-60999 by default), from a block of 1000 per pytest-xdist worker, and
    each is checked to be bindable first.
    """
    global _ports
    if _ports is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker[2:]) if worker[2:].isdigit() else 0
        # a session's own offset: two suites running at once on one machine rarely meet
        _ports = _PortBlock(20000 + 2000 * (index % 6) + os.getpid() % 1000)
    return next(_ports)


class Running(Protocol):
    """A started job: its launcher process and its output so far."""

    proc: subprocess.Popen[Any]

    def text(self) -> str: ...


def wait_listening(port: int, job: Running, timeout: float = 60) -> None:
    """Wait until something accepts connections on the loopback ``port``: the c10d rendezvous
    store of the torchrun agent ``job``. Start the other agents of a multi-node job only then.
    Every agent here runs on 127.0.0.1, so each may host the store, and the first to bind its
    port does; a fixed head start for the first agent is not enough on a loaded machine, and
    the job then fails when the test kills the agent that turned out to host it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        assert time.monotonic() < deadline and job.proc.poll() is None, job.text()[-3000:]
        time.sleep(0.05)


class _PortBlock:
    def __init__(self, start: int) -> None:
        self.next, self.end = start, start + 1000

    def __iter__(self) -> "_PortBlock":
        return self

    def __next__(self) -> int:
        while self.next < self.end:
            port, self.next = self.next, self.next + 1
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use by something outside the tests
                return port
        raise RuntimeError("no free loopback port left in this worker's block")


_ports: _PortBlock | None = None


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    output: Any  # what the worker wrote with save_output(), or None


def launch_ranks(scenario: str, out_dir: Path, args: dict[str, Any] | None = None,
                 world_size: int = 2, timeout: float = 180) -> list[RankResult]:
    """Run ``tests/workers.py SCENARIO`` as ``world_size`` real processes forming one gloo group."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = base_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKERS), scenario, str(out_dir), json.dumps(args or {})],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            path = out_dir / f"rank{rank}.json"
            output = json.loads(path.read_text()) if path.exists() else None
            results.append(RankResult(rank, proc.returncode, out, err, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_cli(args: Sequence[str], *, cwd: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (e.g. torchrun or python -m distrib.train) with the repo on the path."""
    return subprocess.run(list(args), cwd=cwd, env=env or base_env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(*args: str) -> list[str]:
    """The argv of ``torchrun`` from this interpreter's environment."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


JOB_ENV = base_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


class LoggedJob(chaos.Job):  # type: ignore[misc, name-defined]
    """A launched job (launch/chaos.py's Job) whose output is kept in a file and watched for
    rank 0's first optimizer step; it runs from the repository root with :data:`JOB_ENV`."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        os.environ.update({k: v for k, v in JOB_ENV.items()
                           if k in ("PYTHONPATH", "OMP_NUM_THREADS")})
        os.chdir(REPO)
        super().__init__(cmd, log)
        self.log_path = log

    def wait_started(self, timeout: float = 120) -> None:
        assert self.started.wait(timeout), self.text()[-3000:]

    def wait_checkpoint(self, ckpt: Path, step: int, timeout: float = 120) -> None:
        """Wait until the job has committed a checkpoint at ``step`` or later in ``ckpt`` (a
        point in training that does not depend on how fast this machine runs it)."""
        from distrib.checkpoint.storage import LocalStorage
        from distrib.checkpoint.store import CheckpointStore

        store, deadline = CheckpointStore(LocalStorage(str(ckpt))), time.monotonic() + timeout
        while (latest := store.latest()) is None or latest.step < step:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text()[-3000:]
            time.sleep(0.01)

    def finish(self, timeout: float = 300) -> int:
        """Wait for the job and for its last output line to reach the log."""
        rc = self.proc.wait(timeout=timeout)
        self.pump.join(timeout=30)
        return int(rc)

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


def chaos_with_sigterm(tmp_path: Path, chaos_args: list[str]) -> dict[str, Any]:
    """The examples' proof under real faults, in one chaos run (``launch/chaos.py --sigterm
    CHAOS_ARGS``): first a SIGTERM to the launcher (``distrib.launch``): exit 75 after an
    emergency checkpoint, and the relaunch resumes there with no step lost; then two SIGKILLs,
    rank 0 first. The run ends bit-identical to its uninterrupted reference. Its checkpoints are
    in ``tmp_path/work/chaos``, its log in ``tmp_path/work/chaos.log``; returns chaos's result."""
    work = tmp_path / "work"
    proc = run_cli([sys.executable, str(REPO / "launch" / "chaos.py"), "--kills", "2",
                    "--sigterm", "--min-delay", "0.1", "--max-delay", "0.6", "--workdir",
                    str(work), "--json", str(tmp_path / "chaos.json"), *chaos_args],
                   cwd=REPO, env=JOB_ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result: dict[str, Any] = json.loads((tmp_path / "chaos.json").read_text())
    assert result["identical"] is True and result["kills"] == 2
    assert "SIGKILL rank 0" in proc.stdout
    preempted = result["sigterm"]
    assert preempted["exit"] == 75 and preempted["emergency_step"] > 0, proc.stdout[-3000:]
    assert preempted["no_steps_lost"] is True, (work / "chaos.log").read_text()[-3000:]
    assert f"{sys.executable} -m distrib.launch --standalone" in proc.stdout
    return result


@pytest.fixture(autouse=True)
def _reset_distrib_logging() -> Iterator[None]:
    """Trainer.fit() gives the ``distrib`` logger its own handler and stops propagation; undo
    that after each test so that caplog works in whatever order tests run."""
    yield
    logger = logging.getLogger("distrib")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def moto_endpoint():  # type: ignore[no-untyped-def]
    """A moto S3 server on loopback for the whole session."""
    from .s3servers import MotoServer

    server = MotoServer()
    yield server.endpoint
    server.stop()


@pytest.fixture
def s3_url(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<fresh bucket>/run`` on the moto server, with this process's AWS env pointed at it."""
    from .s3servers import clear_s3fs_cache, make_bucket, s3_env

    for key, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    clear_s3fs_cache()
    return f"s3://{make_bucket(moto_endpoint)}/run"


# Slow modules in the order their tests should start: the ones with the longest tests first, so
# that two workers end together (each worker holds at most two queued tests: pyproject's
# --maxschedchunk 1). Every other slow test follows them, then the fast ones.
_LONGEST_FIRST = ("test_examples", "test_own_loop", "test_resume_e2e", "test_k8s_manifests",
                  "test_memory_tier", "test_bench", "test_stream", "test_distributed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the slow (multi-process) tests first, the longest of them first: with ``-n`` the
    many short tests then fill the gaps at the end, instead of one worker finishing a long test
    alone while the other idles. Every worker sorts the same collection the same way."""
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return len(_LONGEST_FIRST) + 1
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return _LONGEST_FIRST.index(module) if module in _LONGEST_FIRST else len(_LONGEST_FIRST)
    items.sort(key=rank)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4. Each worker's tests start two or three
    processes of their own, so more workers than cores would only make them wait on each
    other (and on timeouts written for an unloaded machine)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))
