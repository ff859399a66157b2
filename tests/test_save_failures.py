"""Storage errors while training: transient ones are retried, a save that still fails is logged
and training continues, and too many consecutive failures end the job.

The faults come from a real fsspec backend registered as ``flaky://`` (an in-memory file system
that raises on chosen writes), the way any third-party fsspec backend plugs in."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from distrib import Callback, Config, Trainer
from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointStore, SaveFailedError


class FlakyFS(MemoryFileSystem):
    """Writes to paths containing a key of ``faults`` raise its exception, a number of times."""

    protocol = "flaky"
    faults: dict[str, list[BaseException]] = {}
    store: dict = {}  # separate from memory:// # type: ignore[type-arg]
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
        if isinstance(path, str) and path.startswith("flaky://"):
            path = "memory://" + path[len("flaky://"):]
        return super()._strip_protocol(path)

    list_faults: dict[str, list[BaseException]] = {}  # listing a path ending with the key fails

    def ls(self, path, detail=True, **kwargs):  # type: ignore[no-untyped-def]
        for key, errors in self.list_faults.items():
            if path.rstrip("/").endswith(key) and errors:
                raise errors.pop(0)
        return super().ls(path, detail=detail, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):  # type: ignore[no-untyped-def]
        for key, errors in self.faults.items():
            if key in path and errors:
                raise errors.pop(0)
        return super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)

ARGS = ["--task", "tests.tasks:tiny", "--max-epochs", "3", "--save-every-steps", "2",
        "--no-progress", "--no-early-stop", "--no-async-save", "--keep-last", "10"]


@pytest.fixture(autouse=True)
def _clean() -> None:
    FlakyFS.faults = {}
    FlakyFS.list_faults = {}
    FlakyFS.store.clear()


def test_transient_errors_are_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distrib")
    FlakyFS.faults = {"step-000000004/shard": [ConnectionResetError("reset by peer"),
                                               TimeoutError("read timed out")]}
    result = Trainer(Config.from_args(ARGS + ["--checkpoint-dir", "flaky://run1"])).fit()
    log = caplog.text
    assert result.stop_reason == "max_epochs"
    assert log.count("retry") == 2 and "write flaky://run1 failed (ConnectionResetError" in log
    steps = [i.step for i in CheckpointStore(open_storage("flaky://run1")).scan()]
    assert 4 in steps and "checkpoint step 4 failed" not in log


def test_a_failed_save_is_logged_and_training_continues(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.INFO, logger="distrib")
    FlakyFS.faults = {"step-000000004/manifest": [PermissionError("access denied")]}
    result = Trainer(Config.from_args(ARGS + ["--checkpoint-dir", "flaky://run2"])).fit()
    assert result.stop_reason == "max_epochs" and result.global_step == 12
    log = caplog.text
    assert "checkpoint step 4 failed (1/3 consecutive): PermissionError" in log
    store = CheckpointStore(open_storage("flaky://run2"))
    infos = store.scan()
    assert 4 not in [i.step for i in infos if i.status == "valid"]
    assert store.latest().step == 12  # type: ignore[union-attr]
    assert store.completion() is not None


def test_a_listing_error_after_a_commit_is_only_a_warning(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level(logging.INFO, logger="distrib")
    """Retention lists the directory after each commit; that failing does not make the
    committed save a failure."""
    class Arm(Callback):  # after start-up, which lists the directory too
        def on_fit_start(self, trainer: Trainer) -> None:
            FlakyFS.list_faults = {"run5": [PermissionError("listing denied")] * 3}

    result = Trainer(Config.from_args(ARGS + ["--checkpoint-dir", "flaky://run5"]),
                     callbacks=[Arm()]).fit()
    log = caplog.text
    assert result.stop_reason == "max_epochs" and "consecutive" not in log
    assert log.count("is committed, but removing older checkpoints failed") == 3
    assert [i.step for i in CheckpointStore(open_storage("flaky://run5")).scan()][-1] == 12


def test_a_failed_final_save_fails_the_run_and_writes_no_completion_marker() -> None:
    FlakyFS.faults = {"step-000000012/manifest": [PermissionError("access denied")]}
    with pytest.raises(SaveFailedError, match="the final checkpoint could not be written"):
        Trainer(Config.from_args(ARGS + ["--checkpoint-dir", "flaky://run4"])).fit()
    assert CheckpointStore(open_storage("flaky://run4")).completion() is None


def test_consecutive_failures_end_the_job() -> None:
    FlakyFS.faults = {"/step-": [PermissionError("access denied")] * 10}
    config = Config.from_args(ARGS + ["--checkpoint-dir", "flaky://run3",
                                      "--max-failed-saves", "2"])
    trainer = Trainer(config)
    with pytest.raises(SaveFailedError, match="2 consecutive checkpoint saves failed"):
        trainer.fit()
    assert trainer.global_step < 12


def test_storage_options_are_not_saved_or_logged(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distrib")
    secret = "sk-distrib-test-0123456789"
    config = Config.from_args(["--task", "tests.tasks:tiny", "--max-epochs", "1",
                               "--checkpoint-dir", str(tmp_path / "ck"), "--log-level", "debug",
                               "--storage-option", f"secret={secret}"])
    Trainer(config).fit()
    assert "checkpoint step" in caplog.text and secret not in caplog.text
    for path in (tmp_path / "ck").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
