"""The README's own example task and Python API script, run as written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, base_env, run_cli

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text()


def _block(first_line: str) -> str:
    """The README's fenced code block whose first line is ``first_line``."""
    for block in re.findall(r"```(?:python|bash)\n(.*?)```", README, re.S):
        if block.startswith(first_line + "\n"):
            return str(block)
    raise AssertionError(f"no README block starting with {first_line!r}")


def _command(prefix: str) -> list[str]:
    """The README command line that starts with ``prefix`` (as written, split on spaces)."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if line.startswith(prefix):
                return line.split("#")[0].split()
    raise AssertionError(f"no README command starting with {prefix!r}")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the README's mypkg/regress.py and train_regress.py."""
    root = tmp_path_factory.mktemp("project")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "regress.py").write_text(_block("# mypkg/regress.py"))
    (root / "train_regress.py").write_text(_block("# train_regress.py"))
    return root


def _env() -> dict[str, str]:
    env = base_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _export(ck: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = run_cli([sys.executable, "-m", "distrib.ckpt", "export", str(ck), str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=True)  # type: ignore[no-any-return]


def test_the_task_example_runs_as_written(project: Path) -> None:
    cmd = _command("torchrun --nproc_per_node=2 -m distrib.train --task mypkg.regress:build")
    proc = run_cli(cmd, cwd=project, env=_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_mae" in proc.stderr and (project / "checkpoints" / "COMPLETE").exists()
    typo = run_cli([sys.executable, "-m", "distrib.train", "--task", "mypkg.regress:build",
                    "--task-arg", "sample=100", "--check-config"], cwd=project, env=_env())
    assert typo.returncode == 2
    assert "mypkg.regress:build does not use 'sample' (it reads: samples)" in typo.stderr


def test_the_api_script_is_reproducible_and_returns_a_complete_result(project: Path) -> None:
    script = [sys.executable, "train_regress.py"]
    assert _command("python train_regress.py") == ["python", "train_regress.py"]
    runs = []
    for where in ("runs/a", "runs/b"):
        proc = run_cli(script + ["--checkpoint-dir", where], cwd=project, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_export(project / where, project / f"{where.replace('/', '-')}.pt"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # seeded before build
    first = proc.stdout.strip().splitlines()[-1]
    again = run_cli(script + ["--checkpoint-dir", "runs/b"], cwd=project, env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    stop, epochs, best, mae = again.stdout.split()
    assert stop == "already_complete" and [epochs, best, mae] == first.split()[1:]


def test_the_api_script_under_the_launcher_exits_with_the_workers_code(project: Path) -> None:
    launch = _command("python -m distrib.launch --standalone --nproc_per_node=2 train_regress")
    cmd = [sys.executable, *launch[1:]]
    done = run_cli(cmd + ["--checkpoint-dir", "runs/launched"], cwd=project, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    job = subprocess.Popen(cmd + ["--checkpoint-dir", "runs/preempted", "--max-epochs", "500",
                                  "--no-early-stop"], cwd=project, env=_env(),
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (project / "runs" / "preempted" / "progress.json").exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 75, err[-3000:]
    assert "exiting with code 75" in err and "Traceback" not in err
