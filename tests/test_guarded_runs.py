"""What a run does when its directory or its flags are not what they should be: a damaged final
checkpoint, trouble after a commit, another run's checkpoints, read-only locations, bad output
paths for the tools, leftovers, and the messages on the way."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from distrib import Callback, Config, Trainer
from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.format import Meta
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import MANIFEST, CheckpointStore, step_dir
from distrib.ckpt import main as ckpt_main
from distrib.report import main as report_main

from .ckpt_helpers import training_state
from .conftest import REPO, run_cli

TINY = ["--task", "tests.tasks:tiny", "--no-progress", "--no-early-stop", "--log-every-steps",
        "0"]


def _train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return run_cli([sys.executable, "-m", "distrib.train", *TINY, *args], cwd=cwd)


# ----------------------------------------------------------------------------- item 6


@pytest.mark.slow
def test_a_damaged_final_checkpoint_is_rebuilt(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    args = ["--max-epochs", "2", "--checkpoint-dir", str(ck), "--save-every-steps", "3"]
    assert _train(*args).returncode == 0
    store = CheckpointStore(LocalStorage(str(ck)))
    final = store.latest()
    assert final is not None and final.manifest is not None
    shard = ck / final.name / final.manifest.shards[0].name
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x40
    shard.write_bytes(bytes(data))
    again = _train(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipping checkpoint {final.name}" in again.stderr
    assert "checksum mismatch" in again.stderr and "to rebuild it" in again.stderr
    store.verify(store.inspect(final.step))  # replaced, not collided with
    done = _train(*args)
    assert done.returncode == 0 and "run already complete" in done.stderr


# ----------------------------------------------------------------------------- item 7


class DamageOlderManifest(Callback):
    """At one step, garble the manifest of the oldest checkpoint (retention scans it at every
    save afterwards)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.at:
            root = Path(trainer.config.ckpt.checkpoint_dir)
            oldest = sorted(root.glob("step-*"))[0]
            (oldest / MANIFEST).write_text('{"format": "distrib-checkpoint", "files": 5}')


def test_trouble_after_a_commit_is_not_a_failed_save(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distrib")
    config = Config.from_args(TINY + ["--max-epochs", "3", "--save-every-steps", "2",
                                      "--keep-last", "2", "--checkpoint-dir", str(tmp_path)])
    trainer = Trainer(config, callbacks=[DamageOlderManifest(at=5)])
    result = trainer.fit()
    log = caplog.text
    assert "checkpoint step 6 saved" in log and "checkpoint step 12 saved" in log
    assert result.stop_reason == "max_epochs" and "failed (" not in log
    assert trainer.checkpointer.failures == 0


def test_a_commit_resets_the_failure_count() -> None:
    from .test_save_failures import ARGS, FlakyFS

    FlakyFS.faults = {"step-000000004/manifest": [PermissionError("denied")],
                      "step-000000006/manifest": [PermissionError("denied")],
                      "step-000000010/manifest": [PermissionError("denied")],
                      "step-000000012/manifest": [PermissionError("denied")]}
    FlakyFS.store.clear()
    trainer = Trainer(Config.from_args(ARGS + ["--checkpoint-dir", "flaky://reset",
                                               "--max-failed-saves", "3", "--max-epochs",
                                               "4"]))
    result = trainer.fit()  # 2 failures, a commit at 8, 2 failures: never 3 in a row
    assert result.stop_reason == "max_epochs" and trainer.checkpointer.failures == 0


# ----------------------------------------------------------------------------- item 8


@pytest.mark.slow
def test_another_runs_checkpoints_are_not_resumed_silently(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    base = ["--checkpoint-dir", str(ck)]
    assert _train(*base, "--max-epochs", "1").returncode == 0
    for change, key in ((["--lr", "0.01"], "--lr 0.001 -> 0.01"),
                        (["--optimizer", "sgd"], "--optimizer 'adamw' -> 'sgd'"),
                        (["--seed", "1"], "--seed 0 -> 1"),
                        (["--task", "tests.tasks:skewed"], "--task 'tests.tasks:tiny' -> "),
                        (["--task-arg", "width=32"], "--task-arg {} -> {\"width\": \"32\"}")):
        proc = _train(*base, "--max-epochs", "2", *change)
        assert proc.returncode == 2, (change, proc.stderr[-2000:])
        assert key in proc.stderr and "--allow-config-change" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "already complete" not in proc.stderr
    finished = _train(*base, "--max-epochs", "1", "--task", "tests.tasks:skewed")
    assert finished.returncode == 2 and "already complete" not in finished.stderr
    longer = _train(*base, "--max-epochs", "2", "--log-level", "info")
    assert longer.returncode == 0
    assert "options changed since the checkpoint: --max-epochs 1 -> 2" in longer.stderr
    allowed = _train(*base, "--max-epochs", "3", "--lr", "0.01", "--allow-config-change")
    assert allowed.returncode == 0 and "--allow-config-change" in allowed.stderr


# ----------------------------------------------------------------------------- item 10


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nothing may be written in: a read-only tmpfs as root (where mounting is
    allowed), a directory without write permission otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_read_only_locations_are_refused_before_anything_starts(read_only_dir: Path,
                                                                tmp_path: Path) -> None:
    for where in (read_only_dir, read_only_dir / "run"):
        for flag in ("--checkpoint-dir", "--log-dir"):
            args = [flag, str(where)] + (["--checkpoint-dir", str(tmp_path / "ck")]
                                         if flag == "--log-dir" else [])
            proc = _train(*args, "--max-epochs", "1")
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert f"{flag}: {where} is not writable" in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_a_regular_file_as_checkpoint_dir(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    proc = _train("--checkpoint-dir", str(target), "--check-config")
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    assert target.read_text() == "x"


# ----------------------------------------------------------------------------- item 11


@pytest.fixture
def run(tmp_path: Path) -> Path:
    store = CheckpointStore(LocalStorage(str(tmp_path / "run")), shard_bytes=2048)
    store.save_state(10, training_state(10), {"epoch": 1})
    return tmp_path / "run"


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], main: Any, *argv: str) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 2, out
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err, out.err
    return out.err


def test_tool_output_paths(run: Path, tmp_path: Path, read_only_dir: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_exit_2(capsys, ckpt_main, "export", str(run), "/missing/dir/x.pt")
    assert "/missing/dir is not a directory" in err
    (tmp_path / "adir.pt").mkdir()
    assert "is a directory" in _one_line_exit_2(capsys, ckpt_main, "export", str(run),
                                                 str(tmp_path / "adir.pt"))
    assert "not writable" in _one_line_exit_2(capsys, ckpt_main, "export", str(run),
                                               str(read_only_dir / "x.pt"))
    for out in ("x.txt", "", "/tmp", str(tmp_path / "adir.pt"), str(tmp_path / ".png")):
        _one_line_exit_2(capsys, report_main, str(run), "--out", out)
    assert not (tmp_path / ".png").exists() and not Path("/tmp.png").exists()


def test_prune_on_a_read_only_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only copy needs root")
    src = tmp_path / "src"
    store = CheckpointStore(LocalStorage(str(src)), shard_bytes=2048)
    for step in (1, 2, 3):
        store.save_state(step, {"w": torch.full((4,), float(step))}, {"epoch": step})
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=False)
        err = _one_line_exit_2(capsys, ckpt_main, "prune", str(ro), "--keep-last", "1")
        assert "Read-only file system" in err or "Permission" in err
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    assert sorted(p.name for p in src.iterdir()) == [step_dir(s) for s in (1, 2, 3)]


def test_ls_on_s3_without_credentials(s3_url: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from .s3servers import clear_s3fs_cache

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    clear_s3fs_cache()
    assert "NoCredentialsError" in _one_line_exit_2(capsys, ckpt_main, "ls", s3_url)


# ----------------------------------------------------------------------------- item 12


def test_tensorboard_staging_of_a_remote_log_dir_is_removed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    before = set(Path(tempfile.gettempdir()).glob("distrib-tb-*"))
    Trainer(Config.from_args(TINY + ["--max-epochs", "1", "--checkpoint-dir", str(tmp_path),
                                     "--log-dir", "memory://tb-staging/logs",
                                     "--tensorboard"])).fit()
    assert set(Path(tempfile.gettempdir()).glob("distrib-tb-*")) == before


class SlowStorage(LocalStorage):
    """Writes of one step take a while, so the next save finds it still in flight."""

    def write(self, rel: str, chunks: Any) -> None:
        if "step-000000001" in rel:
            time.sleep(0.5)
        super().write(rel, chunks)


def test_the_wait_message_names_the_save_in_flight(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(SlowStorage(str(tmp_path)))
    ckpt = Checkpointer(store, rank=0, async_save=True)
    state = training_state()
    with caplog.at_level(logging.INFO, logger="distrib"):
        ckpt.save(1, state, {}, Meta())
        ckpt.save(2, state, {}, Meta())
        ckpt.wait()
    assert "checkpoint at step 2 waits for the save of step 1 to finish" in caplog.text


def test_the_fatal_flag_clears_when_a_save_commits() -> None:
    from distrib.checkpoint.storage import open_storage

    from .test_save_failures import FlakyFS

    FlakyFS.store.clear()
    FlakyFS.faults = {"step-000000001/manifest": [PermissionError("denied")],
                      "step-000000002/manifest": [PermissionError("denied")]}
    ckpt = Checkpointer(CheckpointStore(open_storage("flaky://fatal")), rank=0,
                        async_save=False, max_failed_saves=2)
    state = training_state()
    ckpt.save(1, state, {}, Meta())
    ckpt.save(2, state, {}, Meta())
    assert ckpt.fatal and ckpt.failures == 2
    ckpt.save(3, state, {}, Meta())
    assert not ckpt.fatal and ckpt.failures == 0
