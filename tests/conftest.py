"""Shared fixtures: launching real multi-process jobs (gloo) and torchrun."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
