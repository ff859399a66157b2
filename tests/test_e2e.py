"""End to end under real torchrun: the README's default command and its variants."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_cli, torchrun

pytestmark = pytest.mark.slow

TINY = ["--task", "tests.tasks:tiny", "--max-epochs", "2", "--no-progress"]


def _epoch_lines(stderr: str) -> list[dict[str, float]]:
    rows = []
    for line in stderr.splitlines():
        if re.search(r"INFO distrib.training.trainer: epoch \d+/\d+", line):
            rows.append({k: float(v) for k, v in re.findall(r"(\w+_loss|val_\w+) ([\d.]+)", line)})
    return rows


def test_default_command_trains_overfits_stops_early_and_is_idempotent(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m distrib.train` with no arguments: trains the default task,
    whose validation loss turns up, stops early, checkpoints to ./checkpoints; running it again
    finds the run complete and exits 0 at once."""
    proc = run_cli(torchrun("--nproc_per_node=2", "-m", "distrib.train"), cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = _epoch_lines(proc.stderr)
    assert 3 <= len(epochs) < 20
    val = [e["val_loss"] for e in epochs]
    best = val.index(min(val))
    assert 0 < best < len(val) - 1 and val[-1] > val[best]  # validation loss turned up
    train = [e["train_loss"] for e in epochs]
    assert train == sorted(train, reverse=True)  # while training loss kept falling
    assert "early stop after epoch" in proc.stderr
    assert "[rank 1]" not in proc.stderr  # rank 1 logs warnings only
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "COMPLETE" in ckpts and any(n.startswith("step-") for n in ckpts)
    assert json.loads((tmp_path / "checkpoints" / "COMPLETE").read_text())["reason"] == "early_stop"

    started = time.monotonic()
    again = run_cli(torchrun("--nproc_per_node=2", "-m", "distrib.train"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run already complete" in again.stderr
    assert not _epoch_lines(again.stderr)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("launcher", [
    torchrun("--nproc_per_node=1", "-m", "distrib.train"),
    [sys.executable, "-m", "distrib.train"],
    torchrun("--nproc_per_node=8", "-m", "distrib.train"),
], ids=["torchrun-1", "python", "torchrun-8"])
def test_launch_variants(launcher: list[str], tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    proc = run_cli(launcher + TINY + ["--checkpoint-dir", str(ck)], cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_epoch_lines(proc.stderr)) == 2
    assert (ck / "COMPLETE").exists()


def test_failure_on_one_rank_ends_the_torchrun_job(tmp_path: Path) -> None:
    proc = run_cli(torchrun("--nproc_per_node=2", "-m", "distrib.train", "--task",
                            "tests.tasks:failing", "--checkpoint-dir", str(tmp_path / "ck"),
                            "--no-progress"), cwd=REPO, timeout=200)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert not (tmp_path / "ck" / "COMPLETE").exists()
