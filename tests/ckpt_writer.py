"""A checkpoint writer process for fault-injection tests.

    python tests/ckpt_writer.py URL STEP SEED [--kill-at STAGE] [--barrier DIR --peers N]
                                              [--width W] [--shard-bytes B]

It saves ``tests.ckpt_helpers.training_state(SEED)`` as checkpoint STEP. With ``--kill-at`` it
SIGKILLs itself (a real signal, no cleanup) at that stage of the commit protocol:

* ``shard``: while writing the second shard (local: after half of its bytes are on disk;
  object stores: just before its upload);
* ``before-manifest``: after every data file, before the manifest;
* ``manifest``: while writing the manifest (local: half of it on disk; object stores: before the
  create-only upload).

With ``--barrier``, it waits at the commit point until ``--peers`` writers have arrived, so that
racing writers really race. With ``--pause-after-check DIR``, it stops right after finding the
step not committed yet (touching ``DIR/checked``) until ``DIR/go`` exists, so that another
writer can commit in between. Exit codes: 0 committed, 3 another writer won, -9 killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distrib.checkpoint.storage import Buffer, Storage, open_storage  # noqa: E402
from distrib.checkpoint.store import MANIFEST, CheckpointStore  # noqa: E402
from tests.ckpt_helpers import training_state  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyStorage(Storage):
    """Delegates to a real storage, with a SIGKILL or a barrier at one stage."""

    def __init__(self, inner: Storage, kill_at: str | None, barrier: Path | None, peers: int,
                 pause: Path | None = None):
        self.inner, self.kill_at, self.barrier, self.peers = inner, kill_at, barrier, peers
        self.url, self.supports_rename = inner.url, inner.supports_rename
        self.pause, self.paused = pause, False

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def list(self, rel: str = "") -> list[str]:
        return self.inner.list(rel)

    def exists(self, rel: str) -> bool:
        return self.inner.exists(rel)

    def read(self, rel: str, limit: int | None = None) -> bytes:
        try:
            return self.inner.read(rel, limit)
        except FileNotFoundError:
            if self.pause is not None and rel.endswith(MANIFEST) and not self.paused:
                self.paused = True  # "not committed yet": wait while another writer commits
                (self.pause / "checked").touch()
                deadline = time.monotonic() + 60
                while not (self.pause / "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            raise

    def size(self, rel: str) -> int | None:
        return self.inner.size(rel)

    def mkdir(self, rel: str) -> None:
        self.inner.mkdir(rel)

    def delete(self, rel: str) -> None:
        self.inner.delete(rel)

    def delete_tree(self, rel: str) -> None:
        self.inner.delete_tree(rel)

    def _partial_then_die(self, rel: str, data: bytes) -> None:
        if self.inner.supports_rename:
            path = Path(self.inner.root) / rel  # type: ignore[attr-defined]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
        die()

    def write(self, rel: str, chunks: Sequence[Buffer]) -> None:
        if self.kill_at == "shard" and "/shard-00001-" in rel:
            self._partial_then_die(rel, b"".join(bytes(c) for c in chunks))
        self.inner.write(rel, chunks)

    def write_new(self, rel: str, data: bytes) -> None:
        if rel.endswith(MANIFEST):
            if self.kill_at == "before-manifest":
                die()
            if self.kill_at == "manifest":
                self._partial_then_die(rel, data)
            if not self.supports_rename:
                self._wait_for_peers()
        self.inner.write_new(rel, data)

    def rename_dir(self, src: str, dst: str) -> None:
        self._wait_for_peers()
        self.inner.rename_dir(src, dst)

    def _wait_for_peers(self) -> None:
        if self.barrier is None:
            return
        (self.barrier / str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(list(self.barrier.iterdir())) < self.peers and time.monotonic() < deadline:
            time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("step", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("--kill-at", choices=["shard", "before-manifest", "manifest"])
    parser.add_argument("--barrier", type=Path)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--pause-after-check", type=Path)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--shard-bytes", type=int, default=4096)
    args = parser.parse_args()
    storage = FaultyStorage(open_storage(args.url), args.kill_at, args.barrier, args.peers,
                            args.pause_after_check)
    store = CheckpointStore(storage, shard_bytes=args.shard_bytes)
    try:
        store.save_state(args.step, training_state(args.seed, args.width), {"epoch": 0})
    except FileExistsError:
        print("lost the race")
        return 3
    print("committed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
