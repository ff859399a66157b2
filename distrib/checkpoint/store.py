"""The checkpoint layout and commit protocol on a :class:`~distrib.checkpoint.storage.Storage`.

::

    <root>/step-000001200/
        shard-00000-<token>.bin     tensor bytes, each file <= shard_bytes
        state-<token>.json          everything that is not a tensor, plus the tensor index
        manifest.json               written LAST: the commit marker
    <root>/COMPLETE                 the run finished (written after its final checkpoint)

Commit: on local disk the files go into a temporary sibling ``.step-N.tmp-<token>`` directory,
are fsynced, and the directory is renamed into place (then its parent fsynced). On object stores
the data files are uploaded under the final name and the manifest is created with a create-only
write. Either way a step directory without a valid manifest does not exist for readers, and of two
writers racing for the same step exactly one wins; the loser removes only its own files, never
anything committed.

Reading: :meth:`CheckpointStore.scan` classifies every step directory as ``valid`` (the manifest
passes :meth:`distrib.checkpoint.format.Manifest.parse` and every listed file exists with its listed size),
``incomplete`` (no manifest: never committed, or being written) or ``invalid`` (a manifest exists
but breaks the format, a file is missing or of the wrong size, or a path is a symbolic link).
:meth:`CheckpointStore.read` also checks the state file's tensor index against the manifest and
every file's xxh3-128 checksum, and raises :class:`CorruptCheckpoint` on any violation. Everything
read is untrusted (see :mod:`distrib.checkpoint.format`); nothing outside the root is ever opened, sized or
deleted (see :mod:`distrib.checkpoint.storage`). This module is rank-agnostic: the caller decides who writes.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import xxhash

from distrib.checkpoint.format import (
    MAX_MANIFEST_BYTES,
    MAX_MARKER_BYTES,
    MAX_STATE_BYTES,
    FileEntry,
    InvalidCheckpoint,
    Manifest,
    Meta,
    StateIndex,
    parse_marker,
)
from distrib.checkpoint.serialization import (
    ByteSource,
    Layout,
    TensorSink,
    TensorSource,
    flatten_state,
    live_targets,
    plan_layout,
    tensor_indices,
    unflatten_state,
)
from distrib.checkpoint.storage import Storage, StorageError, UnsafePath

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
PROGRESS = "progress.json"
_STEP_RE = re.compile(r"^step-(\d{9,18})$")
_STAGE_RE = re.compile(r"^\.step-(\d{9,18})\.tmp-[0-9a-f]+$")

Status = Literal["valid", "incomplete", "invalid"]


class CheckpointError(RuntimeError):
    """Checkpoints exist but cannot be used (none valid, unreadable on some rank, a bad
    ``--resume`` URL, another run's checkpoints): a permanent error, retrying will not help."""


class SaveFailedError(RuntimeError):
    """Saving kept failing (storage trouble that may pass): retryable, unlike CheckpointError."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest, or break the format."""


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def _checksum(chunks: list[memoryview] | list[bytes]) -> str:
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@dataclass
class CheckpointInfo:
    """One step directory as found on storage."""

    step: int
    name: str
    status: Status
    problem: str | None = None
    manifest: Manifest | None = None
    #: whether a manifest file exists (parsed or not): the writer got as far as committing
    committed: bool = False

    @property
    def metric(self) -> float | None:
        m = self.manifest.meta.metric if self.manifest is not None else None
        return None if m is None else m.value

    @property
    def size(self) -> int:
        return self.manifest.size if self.manifest is not None else 0


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its manifest, the JSON state skeleton and the tensors."""

    info: CheckpointInfo
    skeleton: Any
    tensors: list[torch.Tensor]

    def state(self) -> Any:
        """The state as it was saved (tensors in place of their references)."""
        return unflatten_state(self.skeleton, self.tensors)


class CheckpointStore:
    """Write, find, verify, read and delete checkpoints under one storage root.

    Args:
        storage: where the checkpoints live.
        shard_bytes: the largest shard file, in bytes.
        io_threads: shard files written or read concurrently.
    """

    def __init__(self, storage: Storage, shard_bytes: int = 256 << 20, io_threads: int = 4) -> None:
        if shard_bytes < 1:
            raise ValueError("shard_bytes must be >= 1")
        self.storage = storage
        self.shard_bytes = shard_bytes
        self.io_threads = io_threads
        self._refused: set[str] = set()  # names already warned about (warn once each)

    # ------------------------------------------------------------------ writing

    def save_state(self, step: int, state: Any, meta: Meta | Mapping[str, Any] | None = None,
                   *, replace: bool = False) -> CheckpointInfo:
        """Commit ``state`` (nested dicts/lists of tensors and plain values) as checkpoint
        ``step``, synchronously, writing straight from the tensors' memory: they must not change
        until this returns. See :meth:`write` for the errors."""
        skeleton, tensors = flatten_state(state)
        layout = plan_layout(tensors)
        return self.write(step, TensorSource(tensors, layout), layout, skeleton, meta,
                          replace=replace)

    def load_state(self, info: CheckpointInfo, subtree: str | None = None) -> Any:
        """Read, verify and rebuild the state saved in ``info`` (or one top-level subtree)."""
        return self.read(info, subtree).state()

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint whose manifest parses and whose files have the listed sizes."""
        valid = [i for i in self.scan() if i.status == "valid"]
        return valid[-1] if valid else None

    def write(self, step: int, source: ByteSource, layout: Layout, skeleton: Any,
              meta: Meta | Mapping[str, Any] | None, *, replace: bool = False,
              expected: Sequence[str] | None = None) -> CheckpointInfo:
        """Write and commit checkpoint ``step``.

        ``source`` holds ``layout``'s bytes; ``skeleton`` is the JSON-able rest of the state;
        ``meta`` goes into the manifest (epoch, metric, config ...). An *invalid* committed
        checkpoint of the same step is garbage to every reader and is replaced; a valid one
        raises FileExistsError (another writer won), unless ``replace`` says to replace it too.
        ``expected``: the shards' checksums when the bytes are a copy of a checkpoint with the
        same shard size; any difference is a CorruptCheckpoint before the commit.
        """
        if not isinstance(meta, Meta):
            meta = Meta.parse(dict(meta or {}), "checkpoint metadata")
        token = uuid.uuid4().hex[:12]
        final = step_dir(step)
        existing = self.inspect(step, final)
        if existing.committed:
            if existing.status == "valid" and not replace:
                raise FileExistsError(final)
            if existing.status != "valid":
                log.warning("replacing the invalid checkpoint %s (%s)", final, existing.problem)
            if not self.delete(existing):
                raise FileExistsError(f"{final} cannot be replaced (see the warning above)")
        staged = f".{final}.tmp-{token}" if self.storage.supports_rename else final
        try:
            manifest = self._write_files(step, staged, token, source, layout, skeleton, meta)
            if expected is not None and [f.checksum for f in manifest.shards] != list(expected):
                raise CorruptCheckpoint(f"{final}: the bytes copied differ from their source's "
                                        "checksums (its memory changed or was damaged)")
            self.storage.write_new(f"{staged}/{MANIFEST}", manifest.to_bytes())
            if self.storage.supports_rename:
                self._commit_dir(staged, final, token)
        except BaseException:
            self._discard(staged, token)
            raise
        return CheckpointInfo(step, final, "valid", None, manifest, committed=True)

    def _commit_dir(self, staged: str, final: str, token: str) -> None:
        """Rename ``staged`` to ``final``. An uncommitted leftover in the way (a crashed delete)
        is moved aside first; a committed ``final`` means another writer won: FileExistsError.
        (An empty leftover is replaced by the rename itself.)"""
        try:
            self.storage.rename_dir(staged, final)
            return
        except FileExistsError:
            pass
        aside = f".{final}.tmp-{token}0"
        if self.inspect(int(final[5:]), final).committed:
            raise FileExistsError(final)
        try:
            self.storage.rename_dir(final, aside)
        except FileNotFoundError:  # another writer moved it first: just try to commit
            self.storage.rename_dir(staged, final)
            return
        if self.storage.exists(f"{aside}/{MANIFEST}"):  # a writer committed in between: undo
            try:
                self.storage.rename_dir(aside, final)
            except OSError as exc:
                log.warning("%s: a concurrent commit was moved to %s and cannot go back (%s)",
                            final, aside, exc)
            raise FileExistsError(final)
        self.storage.delete_tree(aside)
        self.storage.rename_dir(staged, final)

    def _write_files(self, step: int, where: str, token: str, source: ByteSource,
                     layout: Layout, skeleton: Any, meta: Meta) -> Manifest:
        source.prepare()
        self.storage.mkdir(where)
        state_name = f"state-{token}.json"
        state = StateIndex(skeleton, layout.total, layout.entries).to_bytes()
        jobs: list[tuple[str, Callable[[], list[memoryview] | list[bytes]]]] = []
        for i, start in enumerate(range(0, layout.total, self.shard_bytes)):
            stop = min(start + self.shard_bytes, layout.total)
            jobs.append((f"shard-{i:05d}-{token}.bin", functools.partial(source.segments, start, stop)))
        jobs.append((state_name, lambda: [state]))

        def put(job: tuple[str, Callable[[], list[memoryview] | list[bytes]]]) -> FileEntry:
            name, chunks_fn = job
            chunks = chunks_fn()
            digest = _checksum(chunks)
            self.storage.write(f"{where}/{name}", chunks)
            return FileEntry(name, sum(len(c) for c in chunks), digest)

        with ThreadPoolExecutor(max_workers=max(1, self.io_threads)) as pool:
            files = tuple(pool.map(put, jobs))
        return Manifest(step=step, created=time.time(), state_file=state_name,
                        shard_bytes=self.shard_bytes, files=files, meta=meta)

    def _discard(self, staged: str, token: str) -> None:
        """Remove what a failed or losing writer wrote (never another writer's files)."""
        try:
            if self.storage.supports_rename:
                self.storage.delete_tree(staged)
                return
            for name in self.storage.list(staged):
                if token in name:
                    self.storage.delete(f"{staged}/{name}")
        except Exception as exc:  # cleanup is best effort; the orphan is collected later
            log.warning("could not clean up %s: %s", staged, exc)

    # ------------------------------------------------------------------ finding

    def scan(self) -> list[CheckpointInfo]:
        """Every step directory, oldest first, classified by manifest and file sizes."""
        infos = []
        for name in self.storage.list(""):
            match = _STEP_RE.match(name)
            if match:
                infos.append(self.inspect(int(match.group(1)), name))
        return sorted(infos, key=lambda i: i.step)

    def inspect(self, step: int, name: str | None = None) -> CheckpointInfo:
        """Classify one step directory without reading its data files. Problems with what is
        there are a status with a one-line reason, never an exception; storage trouble that
        retries did not cure (network, credentials) is raised."""
        name = name or step_dir(step)
        try:
            raw = self.storage.read(f"{name}/{MANIFEST}", limit=MAX_MANIFEST_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return CheckpointInfo(step, name, "incomplete", "no manifest (never committed)")
        except (UnsafePath, StorageError, PermissionError, IsADirectoryError) as exc:
            return CheckpointInfo(step, name, "invalid", f"manifest: {exc}", committed=True)
        try:
            manifest = Manifest.parse(raw, step)
        except InvalidCheckpoint as exc:
            return CheckpointInfo(step, name, "invalid", str(exc), committed=True)
        try:
            sizes = self.storage.sizes(name) if len(manifest.files) > 2 else None
        except (UnsafePath, PermissionError) as exc:
            return CheckpointInfo(step, name, "invalid", str(exc), manifest, True)
        for f in manifest.files:
            try:
                size = sizes.get(f.name) if sizes is not None else \
                    self.storage.size(f"{name}/{f.name}")
            except (UnsafePath, PermissionError) as exc:
                return CheckpointInfo(step, name, "invalid", f"{f.name}: {exc}", manifest, True)
            if size != f.size:
                problem = "missing" if size is None else f"{size} bytes, expected {f.size}"
                return CheckpointInfo(step, name, "invalid", f"{f.name}: {problem}", manifest,
                                      True)
        return CheckpointInfo(step, name, "valid", None, manifest, True)

    # ------------------------------------------------------------------ reading

    def read(self, info: CheckpointInfo, subtree: str | None = None,
             into: Any = None) -> LoadedCheckpoint:
        """Read and verify ``info``; CorruptCheckpoint on any violation.

        The state file's index is checked against the manifest (:class:`StateIndex`) before any
        tensor is allocated. With ``subtree`` (a top-level key of the state, e.g. ``"model"``),
        only the shards that hold its tensors are read (and verified), and only its tensors are
        materialised.

        ``into``: the live objects' state, shaped like the saved one (whole reads only). Its
        CPU tensors that match a saved tensor at the same place receive the bytes in place
        (:func:`live_targets`: no allocation, and loading them afterwards copies nothing), and
        the loaded state holds those very tensors. **When the read raises, they hold a partial
        state**: a caller must then load another checkpoint into them, or stop.
        """
        index, skeleton = self._index(info, subtree)
        layout = Layout(index.tensors, index.total)
        sink = TensorSink(layout, None if subtree is None else tensor_indices(skeleton),
                          live_targets(skeleton, layout, into)
                          if into is not None and subtree is None else None)
        self._read_shards(info, sink, all_shards=subtree is None)
        return LoadedCheckpoint(info, skeleton, sink.tensors)  # type: ignore[arg-type]

    def layout(self, info: CheckpointInfo) -> tuple[Any, Layout]:
        """The skeleton and the tensor layout of ``info`` (its state file read, verified and
        checked against the manifest); CorruptCheckpoint on any violation."""
        index, skeleton = self._index(info, None)
        return skeleton, Layout(index.tensors, index.total)

    def verify(self, info: CheckpointInfo) -> None:
        """Check every file's size and checksum and the tensor index, without keeping any
        tensor; CorruptCheckpoint on the first violation."""
        _, layout = self.layout(info)
        self._read_shards(info, TensorSink(layout, set()), all_shards=True)

    def _index(self, info: CheckpointInfo, subtree: str | None) -> tuple[StateIndex, Any]:
        manifest = info.manifest
        if info.status != "valid" or manifest is None:
            raise CorruptCheckpoint(f"{info.name}: {info.status} ({info.problem})")
        state_raw = self._read_verified(info, manifest.state)
        try:
            index = StateIndex.parse(state_raw, manifest)
            skeleton = index.skeleton
            if subtree is not None:
                if not isinstance(skeleton, dict) or subtree not in skeleton:
                    raise InvalidCheckpoint(f"state file: it holds no {subtree!r}")
                skeleton = skeleton[subtree]
        except InvalidCheckpoint as exc:
            raise CorruptCheckpoint(f"{info.name}: {exc}") from None
        return index, skeleton

    def _read_shards(self, info: CheckpointInfo, sink: TensorSink, all_shards: bool) -> None:
        assert info.manifest is not None
        jobs, start = [], 0
        for entry in info.manifest.shards:
            stop = start + entry.size
            if all_shards or sink.needs(start, stop):
                jobs.append((entry, start, stop))
            start = stop

        def fetch(job: tuple[FileEntry, int, int]) -> None:
            entry, a, b = job
            self._read_verified(info, entry, sink.segments(a, b))

        with ThreadPoolExecutor(max_workers=max(1, self.io_threads)) as pool:
            list(pool.map(fetch, jobs))

    def _read_verified(self, info: CheckpointInfo, entry: FileEntry,
                       into: list[memoryview] | None = None) -> bytes:
        """Read one listed file, check its size and checksum. With ``into`` the bytes land in
        those buffers (filled in order, each checksummed as it lands) and b"" is returned;
        otherwise the bytes are returned (never more than the listed size is read)."""
        path = f"{info.name}/{entry.name}"
        digest = xxhash.xxh3_128()
        data = b""
        try:
            if into is None:
                data = self.storage.read(path, limit=min(entry.size, MAX_STATE_BYTES))
                digest.update(data)
                size = len(data)
            else:
                self.storage.read_segments(path, into, digest.update)
                size = sum(len(b) for b in into)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{path}: missing") from None
        except Exception as exc:
            raise CorruptCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        if size != entry.size:
            raise CorruptCheckpoint(f"{path}: {size} bytes, expected {entry.size}")
        if digest.hexdigest() != entry.checksum:
            raise CorruptCheckpoint(f"{path}: checksum mismatch (file damaged)")
        return data

    # ------------------------------------------------------------------ deleting

    def delete(self, info: CheckpointInfo) -> bool:
        """Delete a checkpoint: the manifest first (it stops existing), then its files. A path
        through a symbolic link is never followed: skipped with a warning (returns False)."""
        try:
            self.storage.delete(f"{info.name}/{MANIFEST}")
            self.storage.delete_tree(info.name)
        except UnsafePath as exc:
            self._refuse(info.name, exc)
            return False
        return True

    def _refuse(self, name: str, exc: BaseException) -> None:
        if name not in self._refused:
            self._refused.add(name)
            log.warning("not deleting %s/%s: %s", self.storage.url, name, exc)

    def collect_orphans(self, newest_committed: int) -> list[str]:
        """Remove staging directories and uncommitted step directories older than
        ``newest_committed``; never one that holds a manifest, never through a link."""
        removed = []
        for name in self.storage.list(""):
            match = _STEP_RE.match(name) or _STAGE_RE.match(name)
            if not match or int(match.group(1)) >= newest_committed:
                continue
            try:
                if name.startswith(".") or not self.storage.exists(f"{name}/{MANIFEST}"):
                    self.storage.delete_tree(name)
                    removed.append(name)
            except UnsafePath as exc:
                self._refuse(name, exc)
        return removed

    # ------------------------------------------------------------------ run completion

    def mark_complete(self, info: Mapping[str, Any]) -> None:
        self.storage.write(COMPLETE, [json.dumps(dict(info), allow_nan=False).encode()])

    def completion(self) -> dict[str, Any] | None:
        """The COMPLETE marker's content, or None if the run has not finished. A marker that
        does not parse is ignored with a warning: the checkpoints decide instead."""
        try:
            raw = self.storage.read(COMPLETE, limit=MAX_MARKER_BYTES)
            return parse_marker(raw, COMPLETE, _COMPLETE_FIELDS)
        except FileNotFoundError:
            return None
        except (InvalidCheckpoint, StorageError, IsADirectoryError) as exc:
            log.warning("ignoring %s/%s: %s", self.storage.url, COMPLETE, exc)
            return None

    def clear_complete(self) -> None:
        for name in (COMPLETE, PROGRESS):
            try:
                self.storage.delete(name)
            except UnsafePath as exc:
                self._refuse(name, exc)

    def write_progress(self, info: Mapping[str, Any]) -> None:
        """Overwrite the progress heartbeat (how far the running job got)."""
        self.storage.write(PROGRESS, [json.dumps(dict(info), allow_nan=False).encode()])

    def progress(self) -> dict[str, Any] | None:
        """The last heartbeat, or None (also when it does not parse)."""
        try:
            raw = self.storage.read(PROGRESS, limit=MAX_MARKER_BYTES)
            return parse_marker(raw, PROGRESS, _PROGRESS_FIELDS)
        except (FileNotFoundError, InvalidCheckpoint, StorageError, IsADirectoryError):
            return None


_COMPLETE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int, "epoch": int, "reason": str, "config": dict, "config_fingerprint": str}
_PROGRESS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int, "epoch": int, "time": (int, float), "reason": str}
