"""Real faults during a checkpoint write: the writer process SIGKILLed at each stage, and
writer processes racing for the same step; on a local directory and on S3 (moto)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointStore, step_dir

from .ckpt_helpers import assert_same, training_state
from .conftest import REPO, base_env
from .s3servers import s3_env

WRITER = REPO / "tests" / "ckpt_writer.py"

# every test starts one to three writer processes (each imports torch): with the multi-process
# tests, not in the quick `-m "not slow"` loop
pytestmark = pytest.mark.slow


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(URL, environment for writer processes)."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), base_env()
    url = request.getfixturevalue("s3_url")
    return url, base_env(**s3_env(request.getfixturevalue("moto_endpoint")))


def _writer(url: str, env: dict[str, str], step: int, seed: int, *extra: str
            ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WRITER), url, str(step), str(seed), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stage", ["shard", "before-manifest", "manifest"])
def test_writer_killed_at_each_stage_leaves_latest_intact(
        target: tuple[str, dict[str, str]], stage: str) -> None:
    url, env = target
    store = CheckpointStore(open_storage(url), shard_bytes=4096)
    store.save_state(1, training_state(1), {"epoch": 0})

    proc = _writer(url, env, 2, 2, "--kill-at", stage)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err  # really killed by SIGKILL

    assert store.latest().step == 1  # type: ignore[union-attr]
    leftover = store.inspect(2)
    assert leftover.status == "incomplete" and not leftover.committed
    plan, loaded = Checkpointer(store, rank=0).plan_start("auto", False, {})
    assert plan.kind == "resume" and plan.name == step_dir(1)

    # the next save succeeds, and cleaning up after it removes the dead writer's leftovers
    ckpt = Checkpointer(store, rank=0, async_save=False)
    ckpt.save(3, training_state(3), {}, {"epoch": 1})
    assert ckpt.failures == 0
    assert store.latest().step == 3  # type: ignore[union-attr]
    names = store.storage.list("")
    assert step_dir(2) not in names and not [n for n in names if n.startswith(".")]
    assert_same(training_state(3)["model"], store.load_state(store.latest(), "model"))


def test_racing_writer_processes_exactly_one_wins(target: tuple[str, dict[str, str]],
                                                  tmp_path: Path) -> None:
    url, env = target
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_writer(url, env, 5, seed, "--barrier", str(barrier), "--peers", "3")
             for seed in range(3)]
    codes = [p.wait(timeout=120) for p in procs]
    assert sorted(codes) == [0, 3, 3], [p.stderr.read() for p in procs]  # type: ignore[union-attr]
    winner = codes.index(0)
    store = CheckpointStore(open_storage(url))
    assert_same(training_state(winner, 96)["model"], store.load_state(store.inspect(5), "model"))
    info = store.inspect(5)
    assert sorted(store.storage.list(step_dir(5))) == sorted(
        [f.name for f in info.manifest.files] + ["manifest.json"])  # type: ignore[union-attr]


def test_a_writer_that_checked_before_another_committed_loses(
        target: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """Writer B finds step 5 not committed, then writer A commits it: B must lose, and A's
    checkpoint must survive (B used to delete it as a leftover and report success too)."""
    url, env = target
    pause = tmp_path / "pause"
    pause.mkdir()
    late = _writer(url, env, 5, 1, "--pause-after-check", str(pause))
    deadline = time.monotonic() + 60
    while not (pause / "checked").exists():
        assert time.monotonic() < deadline and late.poll() is None, late.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.01)
    first = _writer(url, env, 5, 0)
    assert first.wait(timeout=120) == 0, first.stderr.read()  # type: ignore[union-attr]
    (pause / "go").touch()
    assert late.wait(timeout=120) == 3, late.stderr.read()  # type: ignore[union-attr]
    store = CheckpointStore(open_storage(url))
    assert_same(training_state(0, 96)["model"], store.load_state(store.inspect(5), "model"))
    assert [n for n in store.storage.list("") if n.startswith(".")] == []
