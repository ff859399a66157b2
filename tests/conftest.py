"""Shared fixtures: launching real multi-process jobs (gloo) and torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKERS = REPO / "tests" / "workers.py"


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


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"
