"""Byte storage behind a URL: local disk or any fsspec file system. The only module importing fsspec.

Two implementations of one small interface:

* :class:`LocalStorage` for plain paths and ``file://``: ``os`` calls with real durability
  (every file is fsynced; :meth:`Storage.rename_dir` is an atomic same-filesystem rename followed
  by an fsync of the parent directory).
* :class:`FsspecStorage` for everything else (``s3://``, ``memory://``, ``gs://`` ...): no rename;
  :meth:`Storage.write_new` is a create-only write (S3 ``If-None-Match: *``) so that of two
  writers exactly one wins.

Paths given to the methods are relative to the root URL and use ``/``. Transient errors
(connection resets, timeouts, throttling, 5xx) are retried with bounded exponential backoff;
permanent ones (missing file, permission, already exists) are raised at once. Storage options may
hold secrets: they are never logged and never included in error messages.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError)
_TRANSIENT_WORDS = ("timeout", "timed out", "connect", "reset", "throttl", "slowdown",
                    "slow down", "503", "500", "502", "504", "internalerror",
                    "serviceunavailable", "requesttimeout", "temporarily", "broken pipe",
                    "unavailable", "server disconnected", "remotedisconnected")


class StorageError(OSError):
    """A storage operation failed permanently (after retries, if it was transient)."""


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (network trouble or a server-side 5xx/throttle)."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED,
                                                  errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def retry(op: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2,
          max_delay: float = 5.0) -> T:
    """Run ``op``; retry transient failures with jittered exponential backoff, ``attempts`` in all."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        _short(exc), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


class Storage:
    """The interface; see the module docstring. ``url`` is the root, without secrets."""

    url: str
    #: whether :meth:`rename_dir` exists (atomic directory commit) or commits are create-only
    supports_rename: bool
    #: whether :meth:`append` exists (object stores cannot append: rewrite the file instead)
    supports_append = False

    def list(self, rel: str = "") -> list[str]:
        """Names of the direct children of ``rel`` (files and directories); [] if it is absent."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def size(self, rel: str) -> int | None:
        """The size of file ``rel`` in bytes, or None if it does not exist."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def read_segments(self, rel: str, outs: Sequence[memoryview],
                      consume: Callable[[memoryview], None] = lambda mv: None) -> None:
        """Fill ``outs`` in order with the bytes of file ``rel``, calling ``consume`` on each one
        as soon as it is filled; StorageError if the file is not exactly their total size."""
        data = memoryview(self.read(rel))
        total = sum(len(o) for o in outs)
        if len(data) != total:
            raise StorageError(f"{rel}: {len(data)} bytes, expected {total}")
        pos = 0
        for out in outs:
            out[:] = data[pos:pos + len(out)]
            consume(out)
            pos += len(out)

    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        """Write (replace) file ``rel`` from ``chunks`` durably: it is on stable storage on return."""
        raise NotImplementedError

    def write_new(self, rel: str, data: bytes) -> None:
        """Create file ``rel`` only if it does not exist; FileExistsError if another writer won."""
        raise NotImplementedError

    def append(self, rel: str, data: bytes) -> None:
        """Append ``data`` to file ``rel`` (created if absent), without fsync: it survives the
        process being killed, not the machine failing. Only where :attr:`supports_append`."""
        raise NotImplementedError(f"{self.url} cannot append")

    def delete(self, rel: str) -> None:
        """Delete file ``rel``; missing is fine."""
        raise NotImplementedError

    def delete_tree(self, rel: str) -> None:
        """Delete directory ``rel`` and everything under it; missing is fine."""
        raise NotImplementedError

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename directory ``src`` to ``dst``; FileExistsError if ``dst`` exists."""
        raise NotImplementedError(f"{self.url} has no atomic rename")

    def mkdir(self, rel: str) -> None:
        """Create directory ``rel`` and its parents (a no-op on object stores)."""


def _join(*parts: str) -> str:
    """Join path parts with single slashes, keeping a leading slash of the first part."""
    joined = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return "/" + joined if parts and parts[0].startswith("/") else joined


class LocalStorage(Storage):
    """A directory on a local (or network-mounted POSIX) file system."""

    supports_rename = True
    supports_append = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *[p for p in rel.split("/") if p])

    def list(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._path(rel))

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(self._path(rel)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read(self, rel: str) -> bytes:
        with open(self._path(rel), "rb") as fh:
            return fh.read()

    def read_segments(self, rel: str, outs: Sequence[memoryview],
                      consume: Callable[[memoryview], None] = lambda mv: None) -> None:
        total = sum(len(o) for o in outs)
        with open(self._path(rel), "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != total:
                raise StorageError(f"{rel}: {size} bytes, expected {total}")
            for out in outs:
                done = 0
                while done < len(out):
                    n = fh.readinto(out[done:])
                    if not n:
                        raise StorageError(f"{rel}: file ended early")
                    done += n
                consume(out)

    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        self._write(rel, chunks, "wb")

    def write_new(self, rel: str, data: bytes) -> None:
        self._write(rel, [data], "xb")

    def append(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(data)

    def _write(self, rel: str, chunks: Sequence[Buffer], mode: str) -> None:
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, mode, buffering=0) as fh:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[fh.write(view):]
            os.fsync(fh.fileno())

    def delete(self, rel: str) -> None:
        try:
            os.remove(self._path(rel))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel: str) -> None:
        import shutil

        shutil.rmtree(self._path(rel), ignore_errors=True)

    def mkdir(self, rel: str) -> None:
        os.makedirs(self._path(rel), exist_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        dst_path = self._path(dst)
        if os.path.exists(dst_path):
            raise FileExistsError(dst)
        try:
            os.rename(self._path(src), dst_path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(dst) from None
            raise
        fsync_dir(os.path.dirname(dst_path))


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecStorage(Storage):
    """Any fsspec file system; object stores get create-only commits instead of renames."""

    supports_rename = False

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url, **dict(options))
        self.root = self.root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.url = f"{protocol}://{self.root.lstrip('/')}"

    def _path(self, rel: str) -> str:
        return _join(self.root, rel) if rel else self.root

    def _call(self, what: str, op: Callable[[], T]) -> T:
        return retry(op, f"{what} {self.url}")

    def _fresh(self, path: str) -> str:
        """Drop fsspec's listing cache for ``path``: other processes change the store too."""
        self.fs.invalidate_cache(path)
        return path

    def list(self, rel: str = "") -> list[str]:
        path = self._path(rel)

        def op() -> list[str]:
            try:
                entries = self.fs.ls(path, detail=False, refresh=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                           if e.rstrip("/") != path.rstrip("/")})
        return self._call("list", op)

    def exists(self, rel: str) -> bool:
        return bool(self._call("stat", lambda: self.fs.exists(self._fresh(self._path(rel)))))

    def size(self, rel: str) -> int | None:
        def op() -> int | None:
            try:
                info = self.fs.info(self._fresh(self._path(rel)))
            except FileNotFoundError:
                return None
            return None if info.get("type") == "directory" else int(info["size"])
        return self._call("stat", op)

    def read(self, rel: str) -> bytes:
        return bytes(self._call("read", lambda: self.fs.cat_file(self._path(rel))))

    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        # botocore accepts bytes, not memoryviews: one copy of the (bounded-size) file here
        data = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
        self._call("write", lambda: self.fs.pipe_file(self._path(rel), data))

    def write_new(self, rel: str, data: bytes) -> None:
        path = self._path(rel)

        def op() -> None:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:
                # s3fs reports S3's 412 Precondition Failed as OSError(EINVAL) on some servers
                text = str(exc)
                if exc.errno == errno.EINVAL or "412" in text or "PreconditionFailed" in text:
                    raise FileExistsError(rel) from None
                raise
        self._call("create", op)

    def delete(self, rel: str) -> None:
        def op() -> None:
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass
        self._call("delete", op)

    def delete_tree(self, rel: str) -> None:
        def op() -> None:
            try:
                self.fs.rm(self._path(rel), recursive=True)
            except FileNotFoundError:
                pass
        self._call("delete", op)


def parse_options(raw: Mapping[str, str]) -> dict[str, Any]:
    """``--storage-option`` values: JSON where they parse (``anon=true`` -> True), else strings."""
    import json

    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            out[key] = value
    return out


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def check_url(url: str) -> None:
    """Raise ValueError with a user-facing message if ``url``'s scheme cannot be used here."""
    if _is_local(url):
        return
    scheme = url.split("://", 1)[0]
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) > 1)[:12])
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r} "
                         f"(use a local path or one of: {known}, ...)") from None
    except ImportError:
        hint = " (pip install 'distrib[s3]')" if scheme in ("s3", "s3a") else ""
        raise ValueError(f"the {scheme}:// scheme needs a package that is not installed{hint}") \
            from None


def open_storage(url: str, options: Mapping[str, Any] | None = None) -> Storage:
    """The storage for ``url``: local disk for plain paths and ``file://``, fsspec otherwise."""
    check_url(url)
    if _is_local(url):
        return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)
    return FsspecStorage(url, options or {})
