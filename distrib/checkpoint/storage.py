"""Byte storage behind a URL: local disk or any fsspec file system. The only module importing fsspec.

Two implementations of one small interface:

* :class:`LocalStorage` for plain paths and ``file://``: ``os`` calls with real durability
  (every file is fsynced; :meth:`Storage.rename_dir` is an atomic same-filesystem rename followed
  by an fsync of the parent directory).
* :class:`FsspecStorage` for everything else (``s3://``, ``memory://``, ``gs://`` ...): no rename;
  :meth:`Storage.write_new` is a create-only write (S3 ``If-None-Match: *``) so that of two
  writers exactly one wins.

Paths given to the methods are relative to the root URL and use ``/``. They are untrusted
(file names come from manifests on storage): every method first checks that its path stays
inside the root (:func:`check_rel`: no absolute path, no ``.`` or ``..`` component, no empty
component, no control character), and :class:`LocalStorage` refuses any path below the root that
goes through a symbolic link, for reading, listing and deleting alike. Both raise
:class:`UnsafePath`, a permanent error. Transient errors (connection resets, timeouts, throttling,
5xx) are retried with bounded exponential backoff; permanent ones (missing file, permission,
already exists) are raised at once. Storage options may hold secrets: they are never logged and
never included in error messages.
"""

from __future__ import annotations

import abc
import errno
import logging
import mmap
import os
import random
import re
import stat
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview

_TRANSIENT_WORDS = ("timeout", "timed out", "connect", "reset", "throttl", "slowdown",
                    "slow down", "503", "500", "502", "504", "internalerror",
                    "serviceunavailable", "requesttimeout", "temporarily", "broken pipe",
                    "unavailable", "server disconnected", "remotedisconnected")


class StorageError(OSError):
    """A storage operation failed permanently (after retries, if it was transient)."""


class UnsafePath(StorageError):
    """A path that would leave the storage root or pass through a symbolic link: refused."""


# StorageError is raised by this module for conditions that are final (a size mismatch, an
# unsafe path): never retried, whatever its message says
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError, StorageError)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_rel(rel: str) -> str:
    """``rel`` if it is a safe path relative to a storage root; UnsafePath otherwise.

    Safe: ``/``-separated components, none empty, ``.`` or ``..``, no backslash and no control
    character, not absolute. ``""`` is the root itself.
    """
    if not isinstance(rel, str):
        raise UnsafePath(f"not a path: {type(rel).__name__}")
    if rel == "":
        return rel
    if rel.startswith("/") or "\\" in rel or _CONTROL.search(rel):
        raise UnsafePath(f"unsafe path {rel!r}: absolute, or with a control character")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise UnsafePath(f"unsafe path {rel!r}: empty, '.' or '..' component")
    return rel


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


class Storage(abc.ABC):
    """The interface; see the module docstring. ``url`` is the root, without secrets.

    The contract every implementation keeps (pinned by ``tests/storage_contract.py``, run
    against local disk, ``memory://``, S3 and a registered scheme): absent paths list as ``[]``,
    size as None, read as FileNotFoundError, delete silently; :meth:`write_new` raises
    FileExistsError for the second of two creators; :meth:`rename_dir` onto an existing
    directory raises FileExistsError; :meth:`read_segments` raises StorageError when the file is
    not the expected size; a path that leaves the root raises UnsafePath. Implement the
    abstract methods; a scheme that is not an fsspec file system is plugged in with
    :func:`register_storage`.
    """

    url: str
    #: whether :meth:`rename_dir` exists (atomic directory commit) or commits are create-only
    supports_rename: bool
    #: whether :meth:`append` exists (object stores cannot append: rewrite the file instead)
    supports_append = False

    @abc.abstractmethod
    def list(self, rel: str = "") -> list[str]:
        """Names of the direct children of ``rel`` (files and directories); [] if it is absent."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether ``rel`` (a file or a directory) exists."""

    def sizes(self, rel: str) -> dict[str, int]:
        """The regular files directly inside directory ``rel`` and their sizes ({} if it is
        absent). One listing where the store allows it, instead of a request per file."""
        return {name: size for name in self.list(rel)
                if (size := self.size(f"{rel}/{name}" if rel else name)) is not None}

    @abc.abstractmethod
    def size(self, rel: str) -> int | None:
        """The size of file ``rel`` in bytes, or None if it does not exist."""

    @abc.abstractmethod
    def read(self, rel: str, limit: int | None = None) -> bytes:
        """The bytes of file ``rel``. With ``limit``, StorageError if it holds more than that
        many bytes (nothing beyond ``limit + 1`` bytes is read into memory)."""

    def probe(self) -> str | None:
        """Check, without writing anything, that checkpoints can be written here: the root is
        (or can be created as) a writable directory, the bucket exists, the credentials and
        storage options work. Returns a one-line problem, or None."""
        return None

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

    @abc.abstractmethod
    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        """Write (replace) file ``rel`` from ``chunks`` durably: it is on stable storage on return."""

    @abc.abstractmethod
    def write_new(self, rel: str, data: bytes) -> None:
        """Create file ``rel`` only if it does not exist; FileExistsError if another writer won."""

    def append(self, rel: str, data: bytes) -> None:
        """Append ``data`` to file ``rel`` (created if absent), without fsync: it survives the
        process being killed, not the machine failing. Only where :attr:`supports_append`."""
        raise NotImplementedError(f"{self.url} cannot append")

    @abc.abstractmethod
    def delete(self, rel: str) -> None:
        """Delete file ``rel``; missing is fine."""

    @abc.abstractmethod
    def delete_tree(self, rel: str) -> None:
        """Delete directory ``rel`` and everything under it; missing is fine."""

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename directory ``src`` to ``dst``; FileExistsError if ``dst`` exists."""
        raise NotImplementedError(f"{self.url} has no atomic rename")

    def mkdir(self, rel: str) -> None:  # noqa: B027 (a no-op unless a backend has directories)
        """Create directory ``rel`` and its parents (a no-op on object stores)."""


def _join(*parts: str) -> str:
    """Join path parts with single slashes, keeping a leading slash of the first part."""
    joined = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return "/" + joined if parts and parts[0].startswith("/") else joined


class LocalStorage(Storage):
    """A directory on a local (or network-mounted POSIX) file system.

    The root itself may be a symbolic link (the user chose it); below it, no path component may
    be one: a link there could point into another run's directory.
    """

    supports_rename = True
    supports_append = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def _path(self, rel: str) -> str:
        """The absolute path of ``rel``; UnsafePath if it leaves the root or passes through a
        symbolic link (components that do not exist yet are fine)."""
        parts = [p for p in check_rel(rel).split("/") if p]
        path = self.root
        for part in parts:
            path = os.path.join(path, part)
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(mode):
                raise UnsafePath(f"{rel}: {os.path.relpath(path, self.root)} is a symbolic link")
        return os.path.join(self.root, *parts)

    def list(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._path(rel))

    def size(self, rel: str) -> int | None:
        try:
            info = os.lstat(self._path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def _open(self, rel: str) -> int:
        """A read-only descriptor of regular file ``rel`` (never through a link)."""
        fd = os.open(self._path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(f"{rel}: not a regular file")
        return fd

    def read(self, rel: str, limit: int | None = None) -> bytes:
        with open(self._open(rel), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if limit is not None and size > limit:
                raise StorageError(f"{rel}: {size} bytes, more than the {limit} expected")
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise StorageError(f"{rel}: more than the {limit} bytes expected")
        return data

    def map(self, rel: str, size: int) -> mmap.mmap | None:
        """A read-only memory map of regular file ``rel`` (never through a link), which must
        hold exactly ``size`` bytes (StorageError otherwise); None for an empty file."""
        with open(self._open(rel), "rb", buffering=0) as fh:
            found = os.fstat(fh.fileno()).st_size
            if found != size:
                raise StorageError(f"{rel}: {found} bytes, expected {size}")
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def read_segments(self, rel: str, outs: Sequence[memoryview],
                      consume: Callable[[memoryview], None] = lambda mv: None) -> None:
        total = sum(len(o) for o in outs)
        with open(self._open(rel), "rb", buffering=0) as fh:
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
        """Replace file ``rel``; a reader sees the old content or the new, never a part."""
        path = self._path(rel)
        tmp = f"{path}.new-{os.getpid()}-{random.getrandbits(48):012x}"
        self._write(os.path.relpath(tmp, self.root).replace(os.sep, "/"), chunks, "xb")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.remove(tmp)
            raise

    def write_new(self, rel: str, data: bytes) -> None:
        """Create-only, and readers never see a partial file: the bytes go to a temporary
        sibling, which is then hard-linked into place (``link`` fails if the name exists)."""
        path = self._path(rel)
        tmp = f"{path}.new-{os.getpid()}-{random.getrandbits(48):012x}"
        self._write(os.path.relpath(tmp, self.root).replace(os.sep, "/"), [data], "xb")
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(rel) from None
        finally:
            os.remove(tmp)
        fsync_dir(os.path.dirname(path))

    def append(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with open(fd, "ab") as fh:
            fh.write(data)

    def _write(self, rel: str, chunks: Sequence[Buffer], mode: str) -> None:
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_EXCL if mode == "xb" else os.O_TRUNC
        with open(os.open(path, flags, 0o644), "wb", buffering=0) as fh:
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

        path = self._path(rel)  # no link on the way, and rel itself is no link
        if os.path.isdir(path):
            # rmtree does not follow links inside the tree; it removes the links themselves
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)

    def mkdir(self, rel: str) -> None:
        os.makedirs(self._path(rel), exist_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        src_path, dst_path = self._path(src), self._path(dst)
        if os.path.lexists(dst_path):
            raise FileExistsError(dst)
        fsync_dir(src_path)  # the names of the files inside, before they become visible
        try:
            os.rename(src_path, dst_path)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(dst) from None
            raise
        fsync_dir(os.path.dirname(dst_path))

    def probe(self) -> str | None:
        path = self.root
        while not os.path.lexists(path):
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        if not os.path.isdir(path):
            what = "is not a directory" if path == self.root else f"is under {path}, a file"
            return f"{self.root} {what}"
        if not os.access(path, os.W_OK | os.X_OK):
            where = "" if path == self.root else f" ({path} is where it would be created)"
            return (f"{self.root} is not writable{where}: permission denied or a read-only "
                    "file system")
        return None


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
        return _join(self.root, check_rel(rel)) if rel else self.root

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

    def sizes(self, rel: str) -> dict[str, int]:
        path = self._path(rel)

        def op() -> dict[str, int]:
            try:
                entries = self.fs.ls(path, detail=True, refresh=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                    for e in entries if e.get("type") == "file"
                    and e["name"].rstrip("/") != path.rstrip("/")}
        return self._call("list", op)

    def read(self, rel: str, limit: int | None = None) -> bytes:
        path = self._path(rel)
        if limit is None:
            return bytes(self._call("read", lambda: self.fs.cat_file(path)))
        data = bytes(self._call("read", lambda: self.fs.cat_file(path, start=0, end=limit + 1)))
        if len(data) > limit:
            raise StorageError(f"{rel}: more than the {limit} bytes expected")
        return data

    def probe(self) -> str | None:
        bucket = self.root.lstrip("/").split("/", 1)[0]
        protocol = self.url.split("://", 1)[0]
        try:
            try:
                self._call("list", lambda: self.fs.ls(self._fresh(self.root), refresh=True))
            except (FileNotFoundError, NotADirectoryError):  # nothing there yet, or no bucket
                if protocol in _BUCKET_PROTOCOLS and bucket and not self._call(
                        "stat", lambda: self.fs.exists(self._fresh(bucket))):
                    return f"{self.url}: the bucket {bucket!r} does not exist"
        except PermissionError as exc:
            return f"{self.url}: access denied (PermissionError: {_short(exc)}); check the " \
                   "credentials"
        except TypeError as exc:  # the file system's client rejected a --storage-option
            return f"{self.url}: a --storage-option is not accepted: {_short(exc)}"
        except Exception as exc:  # credentials missing, network: one line
            return f"{self.url}: {type(exc).__name__}: {_short(exc)}"
        return None

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


_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")


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
    if _is_local(url) or url.split("://", 1)[0] in _SCHEMES:
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


StorageFactory = Callable[[str, Mapping[str, Any]], Storage]
_SCHEMES: dict[str, StorageFactory] = {}


def register_storage(scheme: str, factory: StorageFactory) -> None:
    """Use ``factory(url, options)`` for URLs ``scheme://...`` (before fsspec is asked): a
    storage that is not an fsspec file system, or a different implementation for one that is.
    Register it in every process that opens such URLs (all ranks, and the ``ckpt`` tool)."""
    if not scheme or "://" in scheme or scheme in ("file",):
        raise ValueError(f"cannot register the scheme {scheme!r}")
    _SCHEMES[scheme] = factory


def open_storage(url: str, options: Mapping[str, Any] | None = None) -> Storage:
    """The storage for ``url``: a registered scheme's, local disk for plain paths and
    ``file://``, fsspec otherwise."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in _SCHEMES:
        return _SCHEMES[scheme](url, options or {})
    check_url(url)
    if _is_local(url):
        return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)
    return FsspecStorage(url, options or {})
