"""Training end to end with checkpoints on S3 (a moto server on loopback)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointStore

from .conftest import REPO, base_env, run_cli, torchrun
from .s3servers import KEY, SECRET, make_bucket, s3_env

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
    assert infos[-1].manifest.meta.config["checkpoint_dir"] == s3_url  # type: ignore[union-attr, index]

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
    """The bucket is deleted while the job runs: every save fails, is logged, training goes on,
    and the configured number of consecutive failures ends the job (retryable exit code 1)."""
    import boto3

    env = base_env(**s3_env(moto_endpoint))
    bucket = make_bucket(moto_endpoint)
    job = subprocess.Popen(torchrun("--nproc_per_node=2", "-m", "distrib.train", "--task",
                                    "tests.tasks:tiny", "--task-arg", "train=4096",
                                    "--max-epochs", "20", "--save-every-steps", "2",
                                    "--max-failed-saves", "3", "--batch-size", "16",
                                    "--checkpoint-dir", f"s3://{bucket}/run", "--no-progress",
                                    "--log-every-steps", "0"),
                           cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for a first checkpoint, then remove the bucket
        if client.list_objects_v2(Bucket=bucket, Prefix="run/step-").get("KeyCount"):
            break
        time.sleep(0.05)
    while time.monotonic() < deadline:
        try:
            for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)
            break
        except client.exceptions.NoSuchBucket:
            break
        except Exception:  # BucketNotEmpty: the job wrote in between
            continue
    _, err = job.communicate(timeout=200)
    assert job.returncode == 1, err[-3000:]
    assert err.count("failed (") >= 3  # each failure was logged
    assert "3 consecutive checkpoint saves failed" in err
    assert "training finished" not in err


@pytest.mark.parametrize("args, message", [
    (["--checkpoint-dir", "s3://no-such-bucket-here/run"],
     "the bucket 'no-such-bucket-here' does not exist"),
    (["--storage-option", "bogus=1"], "a --storage-option is not accepted"),
    (["--log-dir", "s3://no-such-bucket-here/logs"], "--log-dir: s3://no-such-bucket-here/logs"),
], ids=["missing-bucket", "bogus-option", "log-dir-bucket"])
def test_bad_s3_locations_are_refused_before_anything_starts(
        args: list[str], message: str, s3_url: str, moto_endpoint: str) -> None:
    env = base_env(**s3_env(moto_endpoint))
    argv = ["--task", "tests.tasks:tiny", "--no-progress", "--checkpoint-dir", s3_url, *args]
    for cmd in ([sys.executable, "-m", "distrib.train", *argv],
                [sys.executable, "-m", "distrib.launch", "--nproc_per_node=2", "-m",
                 "distrib.train", *argv]):
        proc = run_cli(cmd, cwd=REPO, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "torch.distributed.run" not in proc.stderr  # no worker was started
    assert open_storage(s3_url).list("") == []  # nothing written
