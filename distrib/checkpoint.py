"""The checkpoint layout and commit protocol on a :class:`~distrib.storage.Storage`.

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
writers racing for the same step exactly one wins (the loser removes its own files).

Reading: :meth:`CheckpointStore.scan` classifies every step directory as ``valid`` (manifest parses
and every file exists with its listed size), ``incomplete`` (no manifest, or files missing or of
the wrong size) or ``corrupt`` (the manifest does not parse). :meth:`CheckpointStore.read` also
verifies every file's xxh3-128 checksum and raises :class:`CorruptCheckpoint` on a mismatch.
This module is rank-agnostic: the caller decides who writes.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import xxhash

from distrib.serialization import (ByteSource, Layout, TensorEntry, TensorSink, TensorSource,
                                   flatten_state, plan_layout, tensor_indices, unflatten_state)
from distrib.storage import Storage

log = logging.getLogger(__name__)

FORMAT = "distrib-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
PROGRESS = "progress.json"
CHECKSUM = "xxh3_128"
_STEP_RE = re.compile(r"^step-(\d{9,})$")
_STAGE_RE = re.compile(r"^\.step-(\d{9,})\.tmp-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """Checkpoints exist but cannot be used (none valid, unreadable on some rank, a bad
    ``--resume`` URL): a permanent error, retrying will not help."""


class SaveFailedError(RuntimeError):
    """Saving kept failing (storage trouble that may pass): retryable, unlike CheckpointError."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest."""


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def _checksum(chunks: Iterable[memoryview | bytes]) -> str:
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@dataclass
class CheckpointInfo:
    """One step directory as found on storage."""

    step: int
    name: str
    status: str  # "valid" | "incomplete" | "corrupt"
    problem: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        """Whether a manifest exists (valid or not): the writer got as far as committing."""
        return self.status != "incomplete" or bool(self.manifest)

    @property
    def metric(self) -> float | None:
        value = (self.manifest.get("metric") or {}).get("value")
        return None if value is None else float(value)

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files", []))


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its manifest, the JSON state skeleton and the tensors."""

    info: CheckpointInfo
    skeleton: Any
    tensors: list[torch.Tensor]


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

    # ------------------------------------------------------------------ writing

    def save_state(self, step: int, state: Any, meta: dict[str, Any] | None = None
                   ) -> CheckpointInfo:
        """Commit ``state`` (nested dicts/lists of tensors and plain values) as checkpoint
        ``step``, synchronously, writing straight from the tensors' memory: they must not change
        until this returns. See :meth:`write` for the errors."""
        skeleton, tensors = flatten_state(state)
        layout = plan_layout(tensors)
        return self.write(step, TensorSource(tensors, layout), layout, skeleton, meta or {})

    def load_state(self, info: CheckpointInfo, subtree: str | None = None) -> Any:
        """Read, verify and rebuild the state saved in ``info`` (or one top-level subtree)."""
        loaded = self.read(info, subtree)
        return unflatten_state(loaded.skeleton, loaded.tensors)

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint whose manifest parses and whose files have the listed sizes."""
        valid = [i for i in self.scan() if i.status == "valid"]
        return valid[-1] if valid else None

    def write(self, step: int, source: ByteSource, layout: Layout, skeleton: Any,
              meta: dict[str, Any]) -> CheckpointInfo:
        """Write and commit checkpoint ``step``. FileExistsError if the step is already committed.

        ``source`` holds ``layout``'s bytes; ``skeleton`` is the JSON-able rest of the state;
        ``meta`` goes into the manifest (epoch, metric, config ...).
        """
        token = uuid.uuid4().hex[:12]
        final = step_dir(step)
        staged = f".{final}.tmp-{token}" if self.storage.supports_rename else final
        if self.storage.exists(f"{final}/{MANIFEST}"):
            raise FileExistsError(final)
        if self.storage.supports_rename and self.storage.exists(final):
            self.storage.delete_tree(final)  # an uncommitted leftover (e.g. a half-deleted one)
        try:
            files = self._write_files(staged, token, source, layout, skeleton)
            manifest = {"format": FORMAT, "version": VERSION, "step": step, "checksum": CHECKSUM,
                        "created": time.time(), "state_file": f"state-{token}.json",
                        "shard_bytes": self.shard_bytes,
                        "files": files, **meta}
            data = json.dumps(manifest, indent=1, allow_nan=False).encode()
            self.storage.write_new(f"{staged}/{MANIFEST}", data)
            if self.storage.supports_rename:
                self.storage.rename_dir(staged, final)
        except BaseException:
            self._discard(staged, token)
            raise
        return CheckpointInfo(step, final, "valid", None, manifest)

    def _write_files(self, where: str, token: str, source: ByteSource, layout: Layout,
                     skeleton: Any) -> list[dict[str, Any]]:
        source.prepare()
        self.storage.mkdir(where)
        state = json.dumps({"skeleton": skeleton, "total": layout.total,
                            "tensors": [e.to_json() for e in layout.entries]},
                           allow_nan=False).encode()
        jobs: list[tuple[str, Callable[[], list[memoryview] | list[bytes]]]] = []
        for i, start in enumerate(range(0, layout.total, self.shard_bytes)):
            stop = min(start + self.shard_bytes, layout.total)
            jobs.append((f"shard-{i:05d}-{token}.bin",
                         lambda a=start, b=stop: source.segments(a, b)))
        jobs.append((f"state-{token}.json", lambda: [state]))

        def put(job: tuple[str, Callable[[], list[memoryview] | list[bytes]]]) -> dict[str, Any]:
            name, chunks_fn = job
            chunks = chunks_fn()
            digest = _checksum(chunks)
            self.storage.write(f"{where}/{name}", chunks)
            return {"name": name, "size": sum(len(c) for c in chunks), "checksum": digest}

        with ThreadPoolExecutor(max_workers=max(1, self.io_threads)) as pool:
            return list(pool.map(put, jobs))

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
        """Classify one step directory without reading its data files."""
        name = name or step_dir(step)
        try:
            raw = self.storage.read(f"{name}/{MANIFEST}")
        except FileNotFoundError:
            return CheckpointInfo(step, name, "incomplete", "no manifest (never committed)")
        try:
            manifest = json.loads(raw)
            if manifest.get("format") != FORMAT or int(manifest["step"]) != step:
                raise ValueError("not a distrib manifest for this step")
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return CheckpointInfo(step, name, "corrupt", f"manifest unreadable: {exc}")
        if int(manifest.get("version", 0)) > VERSION:
            return CheckpointInfo(step, name, "corrupt",
                                  f"format version {manifest['version']} is newer than {VERSION}")
        for f in files:
            size = self.storage.size(f"{name}/{f['name']}")
            if size != int(f["size"]):
                problem = "missing" if size is None else f"{size} bytes, expected {f['size']}"
                return CheckpointInfo(step, name, "incomplete", f"{f['name']}: {problem}", manifest)
        return CheckpointInfo(step, name, "valid", None, manifest)

    # ------------------------------------------------------------------ reading

    def read(self, info: CheckpointInfo, subtree: str | None = None) -> LoadedCheckpoint:
        """Read and verify ``info``; CorruptCheckpoint on any mismatch.

        With ``subtree`` (a top-level key of the state, e.g. ``"model"``), only the shards that
        hold its tensors are read (and verified), and only its tensors are materialised.
        """
        files = {f["name"]: f for f in info.manifest["files"]}
        state_raw = self._read_verified(info, files[info.manifest["state_file"]])
        try:
            state = json.loads(state_raw)
            layout = Layout(tuple(TensorEntry.from_json(e) for e in state["tensors"]),
                            int(state["total"]))
            skeleton = state["skeleton"] if subtree is None else state["skeleton"][subtree]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"{info.name}: state file unreadable: {exc}") from None
        sink = TensorSink(layout, None if subtree is None else tensor_indices(skeleton))
        shard_bytes = int(info.manifest["shard_bytes"])
        jobs = []
        for i, name in enumerate(sorted(n for n in files if n.startswith("shard-"))):
            start = i * shard_bytes
            stop = start + int(files[name]["size"])
            if subtree is None or sink.needs(start, stop):
                jobs.append((files[name], start, stop))

        def fetch(job: tuple[dict[str, Any], int, int]) -> None:
            entry, start, stop = job
            self._read_verified(info, entry, sink.segments(start, stop))

        with ThreadPoolExecutor(max_workers=max(1, self.io_threads)) as pool:
            list(pool.map(fetch, jobs))
        return LoadedCheckpoint(info, skeleton, sink.tensors)  # type: ignore[arg-type]

    def _read_verified(self, info: CheckpointInfo, entry: dict[str, Any],
                       into: list[memoryview] | None = None) -> bytes:
        """Read one listed file, check its size and checksum. With ``into`` the bytes land in
        those buffers (filled in order, each checksummed as it lands) and b"" is returned;
        otherwise the bytes are returned."""
        path = f"{info.name}/{entry['name']}"
        digest = xxhash.xxh3_128()
        data = b""
        try:
            if into is None:
                data = self.storage.read(path)
                digest.update(data)
                size = len(data)
            else:
                self.storage.read_segments(path, into, digest.update)
                size = sum(len(b) for b in into)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{path}: missing") from None
        except Exception as exc:
            raise CorruptCheckpoint(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        if size != int(entry["size"]):
            raise CorruptCheckpoint(f"{path}: {size} bytes, expected {entry['size']}")
        if digest.hexdigest() != entry["checksum"]:
            raise CorruptCheckpoint(f"{path}: checksum mismatch (file damaged)")
        return data

    def verify(self, info: CheckpointInfo) -> None:
        """Check every file's size and checksum; CorruptCheckpoint on the first mismatch."""
        for entry in info.manifest.get("files", []):
            self._read_verified(info, entry)

    # ------------------------------------------------------------------ deleting

    def delete(self, info: CheckpointInfo) -> None:
        """Delete a checkpoint: the manifest first (it stops existing), then its files."""
        self.storage.delete(f"{info.name}/{MANIFEST}")
        self.storage.delete_tree(info.name)

    def collect_orphans(self, newest_committed: int) -> list[str]:
        """Remove uncommitted step and staging directories older than ``newest_committed``."""
        removed = []
        for name in self.storage.list(""):
            match = _STEP_RE.match(name) or _STAGE_RE.match(name)
            if not match or int(match.group(1)) >= newest_committed:
                continue
            if name.startswith(".") or not self.storage.exists(f"{name}/{MANIFEST}"):
                self.storage.delete_tree(name)
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ run completion

    def mark_complete(self, info: dict[str, Any]) -> None:
        self.storage.write(COMPLETE, [json.dumps(info, allow_nan=False).encode()])

    def completion(self) -> dict[str, Any] | None:
        """The COMPLETE marker's content, or None if the run has not finished."""
        try:
            return dict(json.loads(self.storage.read(COMPLETE)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"unreadable": True}

    def clear_complete(self) -> None:
        self.storage.delete(COMPLETE)
        self.storage.delete(PROGRESS)

    def write_progress(self, info: dict[str, Any]) -> None:
        """Overwrite the progress heartbeat (how far the running job got)."""
        self.storage.write(PROGRESS, [json.dumps(info).encode()])

    def progress(self) -> dict[str, Any] | None:
        """The last heartbeat, or None."""
        try:
            return dict(json.loads(self.storage.read(PROGRESS)))
        except (FileNotFoundError, ValueError):
            return None
