"""The storage contract, run against every backend: local disk, ``memory://``, S3 (moto) and a
scheme registered with :func:`distrib.checkpoint.storage.register_storage` that is not an fsspec file
system at all. The checkpoint store then works on the registered one too."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from distrib.checkpoint.storage import (
    Buffer,
    Storage,
    StorageError,
    check_rel,
    open_storage,
    register_storage,
)
from distrib.checkpoint.store import CheckpointStore

from .ckpt_helpers import assert_same, training_state
from .storage_contract import StorageContract


class DictStorage(Storage):
    """A key-value store in this process: the smallest complete Storage (no rename, so commits
    are create-only, as on an object store)."""

    supports_rename = False
    buckets: dict[str, dict[str, bytes]] = {}

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.files = self.buckets.setdefault(self.url, {})
        self.lock = threading.Lock()

    def _key(self, rel: str) -> str:
        return check_rel(rel)

    def list(self, rel: str = "") -> list[str]:
        prefix = self._key(rel) + "/" if rel else ""
        return sorted({k[len(prefix):].split("/")[0] for k in self.files if k.startswith(prefix)})

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        return key in self.files or any(k.startswith(key + "/") for k in self.files)

    def size(self, rel: str) -> int | None:
        data = self.files.get(self._key(rel))
        return None if data is None else len(data)

    def read(self, rel: str, limit: int | None = None) -> bytes:
        try:
            data = self.files[self._key(rel)]
        except KeyError:
            raise FileNotFoundError(rel) from None
        if limit is not None and len(data) > limit:
            raise StorageError(f"{rel}: more than {limit} bytes")
        return data

    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        self.files[self._key(rel)] = b"".join(bytes(c) for c in chunks)

    def write_new(self, rel: str, data: bytes) -> None:
        with self.lock:
            if self._key(rel) in self.files:
                raise FileExistsError(rel)
            self.files[self._key(rel)] = bytes(data)

    def delete(self, rel: str) -> None:
        self.files.pop(self._key(rel), None)

    def delete_tree(self, rel: str) -> None:
        prefix = self._key(rel) + "/"
        for key in [k for k in self.files if k.startswith(prefix)]:
            del self.files[key]


register_storage("kv", DictStorage)


class TestLocal(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return open_storage(str(tmp_path / "root"))


class TestMemory(StorageContract):
    @pytest.fixture
    def storage(self) -> Storage:
        return open_storage(f"memory://contract-{uuid.uuid4().hex[:8]}/root")


class TestS3(StorageContract):
    @pytest.fixture
    def storage(self, s3_url: str) -> Storage:
        return open_storage(s3_url)


class TestRegisteredScheme(StorageContract):
    @pytest.fixture
    def storage(self) -> Storage:
        return open_storage(f"kv://contract-{uuid.uuid4().hex[:8]}")


def test_the_checkpoint_store_runs_on_a_registered_scheme() -> None:
    store = CheckpointStore(open_storage("kv://checkpoints"), shard_bytes=4096)
    state = training_state(width=96)
    info = store.save_state(3, state, {"epoch": 1})
    assert store.latest() is not None and store.latest().step == 3  # type: ignore[union-attr]
    assert_same(state, store.load_state(info))
    with pytest.raises(ValueError):
        register_storage("file", DictStorage)
