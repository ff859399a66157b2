"""Against a real S3 server that checks signatures and survives kill -9: SeaweedFS on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointStore, step_dir

from .ckpt_helpers import assert_same, training_state
from .conftest import REPO, base_env, run_cli, torchrun
from .s3servers import KEY, SECRET, SeaweedFS, clear_s3fs_cache, s3_env

pytestmark = pytest.mark.slow
WRITER = REPO / "tests" / "ckpt_writer.py"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


@pytest.fixture
def weed_env(weed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = s3_env(weed.endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    clear_s3fs_cache()
    return base_env(**env)


def test_training_job_checkpoints_to_seaweedfs(weed: SeaweedFS, weed_env: dict[str, str],
                                               tmp_path: Path) -> None:
    url = f"s3://{weed.bucket}/train-{time.monotonic_ns()}"
    cmd = torchrun("--nproc_per_node=2", "-m", "distrib.train", "--task", "tests.tasks:tiny",
                   "--max-epochs", "3", "--save-every-steps", "2", "--checkpoint-dir", url,
                   "--no-progress")
    proc = run_cli(cmd, cwd=REPO, env=weed_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verify = run_cli([sys.executable, "-m", "distrib.ckpt", "verify", url], cwd=REPO,
                     env=weed_env)
    assert verify.returncode == 0 and verify.stdout.count(": ok") == 3, verify.stdout
    again = run_cli(cmd, cwd=REPO, env=weed_env)
    assert again.returncode == 0 and "run already complete" in again.stderr


def test_racing_writers_on_seaweedfs(weed: SeaweedFS, weed_env: dict[str, str],
                                     tmp_path: Path) -> None:
    url = f"s3://{weed.bucket}/race-{time.monotonic_ns()}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(WRITER), url, "4", str(seed), "--barrier",
                               str(barrier), "--peers", "2"], env=weed_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    assert sorted(codes) == [0, 3]
    store = CheckpointStore(open_storage(url))
    assert_same(training_state(codes.index(0), 96)["model"],
                store.load_state(store.inspect(4), "model"))


def test_server_killed_and_restarted_during_upload(weed: SeaweedFS, weed_env: dict[str, str]
                                                   ) -> None:
    """SIGKILL the S3 server while a checkpoint uploads, restart it: the save is retried to
    completion or reported as failed, and the checkpoint is never visible half-written."""
    url = f"s3://{weed.bucket}/outage-{time.monotonic_ns()}"
    store = CheckpointStore(open_storage(url))
    store.save_state(1, training_state(1), {"epoch": 0})
    writer = subprocess.Popen([sys.executable, str(WRITER), url, "2", "2", "--width", "768",
                               "--shard-bytes", str(64 << 10)], env=weed_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.startswith("shard-") for n in store.storage.list(step_dir(2))):
        assert time.monotonic() < deadline and writer.poll() is None, "upload never started"
        time.sleep(0.02)
    weed.kill()
    assert writer.poll() is None, "the upload finished before the server was killed"
    time.sleep(1.0)
    weed.start()
    out, err = writer.communicate(timeout=180)
    clear_s3fs_cache()
    store = CheckpointStore(open_storage(url))
    info = store.inspect(2)
    if writer.returncode == 0:  # retried through the outage (by botocore, s3fs or distrib)
        assert info.status == "valid"
        assert_same(training_state(2, 768)["model"], store.load_state(info, "model"))
    else:  # gave up: reported, and nothing half-visible
        assert not info.committed, info
        assert store.latest().step == 1  # type: ignore[union-attr]
    print(f"writer exit {writer.returncode}; retries logged: {err.count('retry')}")


def test_bad_credentials_are_a_clear_error_without_the_secret(weed: SeaweedFS) -> None:
    env = base_env(**s3_env(weed.endpoint, key=KEY, secret="wrong-" + SECRET))
    url = f"s3://{weed.bucket}/anything"
    ls = run_cli([sys.executable, "-m", "distrib.ckpt", "ls", url], cwd=REPO, env=env)
    assert ls.returncode == 2
    assert "access denied" in ls.stderr and "Traceback" not in ls.stderr
    train = run_cli([sys.executable, "-m", "distrib.train", "--task", "tests.tasks:tiny",
                     "--checkpoint-dir", url, "--no-progress"], cwd=REPO, env=env)
    assert train.returncode == 2
    assert "access denied" in train.stderr and len(train.stderr.strip().splitlines()) == 1
    for text in (ls.stdout, ls.stderr, train.stdout, train.stderr):
        assert SECRET not in text
