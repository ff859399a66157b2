"""A checkpoint directory is untrusted input: every tamper in :mod:`tests.tampering`, on local
disk and on S3 (moto), against resume with 1 rank (in process) and 2 ranks (real processes),
``ckpt ls``, ``ls --verify``, ``verify``, ``export``, ``inspect`` and ``prune``.

Asserted for each: no traceback, the documented exit code, resume falls back to the older valid
checkpoint (and the run then replaces the invalid one), and no path outside the checkpoint root
is opened, sized, listed or deleted: every path the storage layer resolves is audited, a Python
audit hook watches the sentinel directory beside the root and /etc/passwd, and the sentinel's
files are unchanged at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from distrib import Callback, Config, Trainer
from distrib.checkpoint.storage import FsspecStorage, LocalStorage, Storage, open_storage
from distrib.checkpoint.store import CheckpointStore
from distrib.ckpt import main as ckpt_main

from .conftest import launch_ranks
from .s3servers import s3_env
from .tampering import FALLBACK, NEWEST, SEMANTIC, STEP, TAMPERS, Tamper

JOB = ["--task", "tests.tasks:tiny", "--task-arg", "train=64", "--task-arg", "val=16",
       "--batch-size", "16", "--max-epochs", "1", "--save-every-steps", "2", "--keep-last", "10",
       "--no-early-stop", "--no-progress", "--shard-size-mb", "0.004", "--log-every-steps", "0"]

# ----------------------------------------------------------------------------- auditing

_WATCHED: list[str] = []  # path prefixes nobody may touch (filled per test)
_SEEN: list[str] = []
_EVENTS = {"open", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree", "os.listdir",
           "os.scandir", "os.rename", "os.replace", "os.truncate", "os.chmod"}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event in _EVENTS and _WATCHED and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0]) if not isinstance(args[0], int) else ""
        if any(path.startswith(w) for w in _WATCHED):
            _SEEN.append(f"{event} {path}")


sys.addaudithook(_hook)  # cannot be removed: it only records while _WATCHED is set


@pytest.fixture
def audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path the storage layer resolves (local and fsspec), for the test to check."""
    resolved: list[str] = []
    for cls in (LocalStorage, FsspecStorage):
        original = cls._path

        def spy(self: Storage, rel: str, _original: Callable[..., str] = original) -> str:
            path = _original(self, rel)
            resolved.append(path)
            return path
        monkeypatch.setattr(cls, "_path", spy)
    yield resolved


def _watching(paths: list[str]) -> Any:
    class Watch:
        def __enter__(self) -> list[str]:
            _SEEN.clear()
            _WATCHED[:] = paths
            return _SEEN

        def __exit__(self, *exc: object) -> None:
            _WATCHED.clear()
    return Watch()


# ----------------------------------------------------------------------------- the runs


class StartStep(Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.step = trainer.global_step


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-rank run with checkpoints at steps 2 and 4 (several shards each), its
    COMPLETE marker removed (so a relaunch resumes from the newest checkpoint)."""
    root = tmp_path_factory.mktemp("base") / "run"
    Trainer(Config.from_args(JOB + ["--checkpoint-dir", str(root), "--log-level",
                                    "warning"])).fit()
    for name in ("COMPLETE", "progress.json"):
        (root / name).unlink()
    shutil.rmtree(root / "logs")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [
        f"step-{s:09d}" for s in (FALLBACK, NEWEST)]
    assert len(list((root / STEP).glob("shard-*"))) >= 2
    return root


@dataclass
class Backend:
    """Where copies of the base run live: a local directory or an S3 prefix."""

    kind: str
    root: str  # local directory or s3://bucket
    sentinel: str  # another run's files beside the root (must stay untouched)
    env: dict[str, str]

    def copy(self, base: Path, name: str) -> str:
        url = f"{self.root}/{name}"
        if self.kind == "local":
            shutil.copytree(base, url)
        else:
            storage = open_storage(url)
            assert isinstance(storage, FsspecStorage)
            storage.fs.put(str(base), storage.root, recursive=True)
        return url

    def sentinel_state(self) -> dict[str, Any]:
        """Every file of the sentinel run with its content (local) or ETag (S3)."""
        if self.kind == "local":
            return {str(p): p.read_bytes() for p in Path(self.sentinel).rglob("*")
                    if p.is_file()}
        storage = open_storage(self.sentinel)
        assert isinstance(storage, FsspecStorage)
        found = storage.fs.find(storage.root, detail=True, refresh=True)
        return {key: (info.get("ETag"), info.get("size")) for key, info in found.items()}


# the S3 half makes about 180 requests to moto per tamper (1.5-2 s each): with the tests that
# start processes, not in the quick tier (-m "not slow"); the local half checks the same tampers
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def backend(request: pytest.FixtureRequest, tmp_path: Path, base: Path) -> Backend:
    if request.param == "local":
        root = tmp_path / "ckpts"
        root.mkdir()
        sentinel = str(tmp_path / "sentinel")
        env: dict[str, str] = {}
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        url = request.getfixturevalue("s3_url")  # s3://<fresh bucket>/run, env set
        root = url.rsplit("/", 1)[0]
        sentinel = f"{root}/sentinel"
        env = s3_env(endpoint)
    b = Backend(request.param, str(root), sentinel, env)
    b.copy(base, "sentinel") if request.param == "s3" else shutil.copytree(base, sentinel)
    return b


def _logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """What distrib logged, whether through pytest's handler or its own on stderr."""
    text = caplog.text + capsys.readouterr().err
    caplog.clear()
    return text


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ckpt_main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err, out.err
    return code, out.out, out.err


def _inside(resolved: list[str], roots: list[str]) -> list[str]:
    """The resolved paths that are not inside one of ``roots``."""
    bad = []
    for path in resolved:
        norm = os.path.normpath(path) if path.startswith("/") else path
        if not any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in roots):
            bad.append(path)
    return bad


def _storage_root(url: str) -> str:
    storage = open_storage(url)
    return storage.root if isinstance(storage, FsspecStorage) else os.path.abspath(url)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_newest_checkpoint(name: str, backend: Backend, base: Path, tmp_path: Path,
                                    audit: list[str], capsys: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    url = backend.copy(base, "run")
    storage = open_storage(url)
    TAMPERS[name](Tamper(storage, outside=str(tmp_path / "outside")))
    before = backend.sentinel_state()
    audit.clear()
    semantic = name in SEMANTIC
    watched = ["/etc/passwd", "/etc/shadow"] + ([backend.sentinel]
                                                if backend.kind == "local" else [])
    out = tmp_path / "model.pt"
    with _watching(watched) as seen:
        code, text, _ = _cli(capsys, "ls", url)
        assert code == 0 and f"\n{NEWEST} " in "\n" + text
        code, text, _ = _cli(capsys, "ls", url, "--verify")
        row = next(line for line in text.splitlines() if line.startswith(f"{NEWEST} "))
        assert code == 0 and (" valid" in row if semantic else " invalid" in row), row
        code, text, _ = _cli(capsys, "verify", url)
        assert code == (0 if semantic else 1), text
        code, text, err = _cli(capsys, "export", url, str(out))
        assert code == 0, err
        exported = f"step-{NEWEST if semantic else FALLBACK:09d}"
        assert f"exported the model of {exported}" in text
        assert semantic or f"skipping {STEP}" in err
        assert torch.load(out, weights_only=True)
        assert _cli(capsys, "inspect", url, "--step", str(NEWEST))[0] == 0
        assert _cli(capsys, "prune", url, "--keep-last", "2")[0] == 0

        start = StartStep()
        with caplog.at_level(logging.WARNING, logger="distrib"):
            result = Trainer(Config.from_args(JOB + ["--checkpoint-dir", url]),
                             callbacks=[start]).fit()
        logs = _logs(caplog, capsys)
        assert start.step == FALLBACK, logs
        assert f"skipping checkpoint {STEP}" in logs
        assert result.global_step == NEWEST and result.stop_reason == "max_epochs"
        assert CheckpointStore(storage).inspect(NEWEST).status == "valid"  # replaced
    assert not seen, seen
    roots = [_storage_root(url), os.path.abspath(out.parent)]
    assert not _inside(audit, roots), _inside(audit, roots)[:5]
    assert backend.sentinel_state() == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_ranks_resume_past_every_tamper(kind: str, base: Path, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    """One 2-rank process group resumes each tampered copy in turn (one launch in all)."""
    if kind == "local":
        root, env = tmp_path / "ckpts", {}
        root.mkdir()
        backend = Backend("local", str(root), "", env)
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        url = request.getfixturevalue("s3_url")
        backend = Backend("s3", url.rsplit("/", 1)[0], "", s3_env(endpoint))
    control = backend.copy(base, "control")  # the newest checkpoint simply gone
    open_storage(control).delete_tree(STEP)
    urls = [control]
    for i, name in enumerate(sorted(TAMPERS)):
        url = backend.copy(base, f"run{i}")
        TAMPERS[name](Tamper(open_storage(url), outside=str(tmp_path / "outside")))
        urls.append(url)
    results = launch_ranks("resume_each", tmp_path / "out",
                           {"urls": urls, "argv": JOB, "env": backend.env}, timeout=600)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert r.output["outside"] == [], r.output["outside"][:5]
        expected = r.output["runs"][0]  # 2 ranks deal the epoch's rest anew: not step 4
        assert expected["start"] == FALLBACK and expected["global_step"] > FALLBACK
        for name, run in zip(sorted(TAMPERS), r.output["runs"][1:]):
            assert run == expected, (name, run)


def test_step_directory_symlinked_to_another_run(tmp_path: Path, base: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """step-N is a symbolic link to another run's step directory: never read, never deleted
    through (retention, prune, orphan collection, --force-restart)."""
    other = tmp_path / "other"
    shutil.copytree(base, other)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    shutil.rmtree(run / STEP)
    (run / STEP).symlink_to(other / STEP)
    older = f"step-{1:09d}"  # older than every real checkpoint: retention would delete it
    (run / older).symlink_to(other / f"step-{FALLBACK:09d}")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with _watching([str(other)]) as seen:
        code, text, _ = _cli(capsys, "ls", str(run), "-v")
        assert code == 0 and "symbolic link" in text
        code, text, _ = _cli(capsys, "prune", str(run), "--keep-last", "1")
        assert code == 0 and "symbolic link is never followed" in text
        start = StartStep()
        with caplog.at_level(logging.WARNING, logger="distrib"):
            Trainer(Config.from_args(JOB + ["--checkpoint-dir", str(run), "--max-epochs", "2"]),
                    callbacks=[start]).fit()  # retention runs after every save
        assert start.step == FALLBACK
        assert "is a symbolic link" in _logs(caplog, capsys)
        Trainer(Config.from_args(JOB + ["--checkpoint-dir", str(run), "--force-restart",
                                        "--max-epochs", "2"])).fit()
    assert not seen, seen
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert (run / STEP).is_symlink() and (run / older).is_symlink()


def test_a_file_symlinked_out_of_the_root_is_never_read(tmp_path: Path, base: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    secret = tmp_path / "secret.bin"
    shard = next((run / STEP).glob("shard-00000-*"))
    secret.write_bytes(shard.read_bytes())  # even the right bytes are not read through a link
    shard.unlink()
    shard.symlink_to(secret)
    with _watching([str(secret)]) as seen:
        code, text, _ = _cli(capsys, "verify", str(run))
        assert code == 1 and "symbolic link" in text
        assert _cli(capsys, "export", str(run), str(tmp_path / "m.pt"))[0] == 0
    assert not seen, seen


def test_complete_marker_garbage_is_ignored(tmp_path: Path, base: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    (run / "COMPLETE").write_bytes(b"[" * 100_000)
    with caplog.at_level(logging.WARNING, logger="distrib"):
        result = Trainer(Config.from_args(JOB + ["--checkpoint-dir", str(run)])).fit()
    logs = _logs(caplog, capsys)
    assert "ignoring" in logs and "COMPLETE" in logs
    assert result.global_step == NEWEST
