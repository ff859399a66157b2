"""Training end to end with checkpoints on S3 (a moto server on loopback)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distrib.checkpoint import CheckpointStore
from distrib.storage import open_storage

from .conftest import REPO, base_env, run_cli, torchrun
from .s3servers import SECRET, s3_env

pytestmark = pytest.mark.slow


def test_two_rank_training_with_async_saves_to_s3(s3_url: str, moto_endpoint: str,
                                                  tmp_path: Path) -> None:
    env = base_env(**s3_env(moto_endpoint))
    cmd = torchrun("--nproc_per_node=2", "-m", "distrib.train", "--task", "tests.tasks:tiny",
                   "--max-epochs", "3", "--save-every-steps", "3", "--keep-last", "2",
                   "--checkpoint-dir", s3_url, "--no-progress")
    proc = run_cli(cmd, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stderr + proc.stdout
    store = CheckpointStore(open_storage(s3_url))
    infos = store.scan()
    assert [i.status for i in infos] == ["valid", "valid"]  # retention kept the newest two
    assert store.completion() is not None
    assert infos[-1].manifest["config"]["checkpoint_dir"] == s3_url

    ls = run_cli([sys.executable, "-m", "distrib.ckpt", "ls", s3_url], cwd=REPO, env=env)
    assert ls.returncode == 0 and "latest" in ls.stdout, ls.stderr
    verify = run_cli([sys.executable, "-m", "distrib.ckpt", "verify", s3_url], cwd=REPO, env=env)
    assert verify.returncode == 0 and verify.stdout.count(": ok") == 2
    out = tmp_path / "model.pt"
    export = run_cli([sys.executable, "-m", "distrib.ckpt", "export", s3_url, str(out)],
                     cwd=REPO, env=env)
    assert export.returncode == 0, export.stderr
    weights = torch.load(out, weights_only=True)
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    again = run_cli(cmd, cwd=REPO, env=env)
    assert again.returncode == 0 and "run already complete" in again.stderr


def test_saves_that_keep_failing_end_the_job_on_every_rank(moto_endpoint: str) -> None:
    """A bucket that does not exist: every save fails, is logged, training goes on, and the
    configured number of consecutive failures ends the job (retryable exit code 1)."""
    env = base_env(**s3_env(moto_endpoint))
    proc = run_cli(torchrun("--nproc_per_node=2", "-m", "distrib.train", "--task",
                            "tests.tasks:tiny", "--max-epochs", "20", "--save-every-steps", "2",
                            "--max-failed-saves", "3", "--checkpoint-dir",
                            "s3://no-such-bucket-here/run", "--no-progress"),
                   cwd=REPO, env=env, timeout=200)
    assert proc.returncode == 1
    assert proc.stderr.count("failed (") >= 3  # each failure was logged
    assert "3 consecutive checkpoint saves failed" in proc.stderr
    assert "training finished" not in proc.stderr
