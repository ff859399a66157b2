"""The memory tier: node-local snapshots of the training state, beside the durable checkpoints.

In data-parallel training every node holds the full model and optimizer state, so each node can
keep a complete, recent copy in node-local shared memory (``/dev/shm`` or another tmpfs) at a
much shorter interval than durable checkpoints can afford. A worker crash then costs the steps
since the last snapshot and a read from memory; a lost node gets the state from a peer.

Layout and protocol: ``<memory_dir>/distrib-<key>/`` holds ordinary checkpoints (shards,
checksums, a manifest written last, an atomic rename), written by one process per node (local
rank 0) through a :class:`~distrib.checkpoint.checkpointer.Checkpointer` with two alternating
slots: before a snapshot is written every older one but the newest is deleted, so a crash in
the middle of a snapshot leaves the previous one intact and the tier never holds more than two.
``<key>`` hashes the durable checkpoint URL and the run identity
(:func:`~distrib.checkpoint.lease.run_identity`), and ``owner.json`` names both: a snapshot of
another job, or of an earlier run of this one, is never used. The per-rank state (RNG, data
position) of every rank is all-gathered into each node's snapshot, so any one node can restart
the whole job.

Everything read from the tier is verified like a durable checkpoint (checksums, the tensor
layout, the state fits the live objects); an unusable snapshot is skipped for the other slot,
then for the durable tier. A node whose memory directory is missing or too small for two
snapshots warns once and runs with the durable tier only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distrib.checkpoint.checkpointer import Checkpointer, ConfigCheck, Persisted
from distrib.checkpoint.format import InvalidCheckpoint, Meta, load_json
from distrib.checkpoint.interval import AutoInterval
from distrib.checkpoint.serialization import (
    FlatBuffer,
    Layout,
    ViewSource,
    flatten_state,
    plan_layout,
    unflatten_state,
    unpack,
)
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import (
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    CorruptCheckpoint,
)
from distrib.runtime import dist

log = logging.getLogger(__name__)

DEFAULT_DIR = "/dev/shm"
OWNER = "owner.json"
SLOTS = 2
#: headroom asked of the memory directory beyond two snapshots' tensor bytes: a factor, and
#: bytes per snapshot for its state index, manifest and page rounding
MARGIN = 1.05
OVERHEAD = 256 << 10


def tier_path(memory_dir: str, durable_url: str, run_id: str) -> str:
    """The directory of this run's snapshots under ``memory_dir``."""
    key = hashlib.sha256(f"{durable_url}\0{run_id}".encode()).hexdigest()[:16]
    return os.path.join(memory_dir, f"distrib-{key}")


@dataclass
class Snapshot:
    """A verified snapshot this node holds (read by every rank of the node)."""

    step: int
    state: dict[str, Any]
    info: CheckpointInfo

    @property
    def epoch(self) -> int:
        return self.info.manifest.meta.epoch if self.info.manifest is not None else 0


class MemoryTier:
    """One node's memory tier; every rank of the job builds one (see the module docstring).

    Args:
        memory_dir: a node-local tmpfs directory (``/dev/shm``).
        durable_url: the durable checkpoint directory this tier shadows.
        run_id: the run identity (snapshots of another identity are never used).
        every_steps: snapshot every N optimizer steps; 0: ``auto`` (Young/Daly, see
            :meth:`due`).
        mtbf_seconds: the expected time between failures for ``auto``.
        check_state, check_config: as for :class:`~distrib.checkpoint.checkpointer.Checkpointer`
            (a snapshot that does not fit is skipped).
    """

    def __init__(self, memory_dir: str, durable_url: str, run_id: str, *, every_steps: int,
                 mtbf_seconds: float = 4 * 3600.0,
                 check_state: Callable[[Any], None] | None = None,
                 check_config: ConfigCheck | None = None,
                 shard_bytes: int = 256 << 20) -> None:
        info = dist.info_from_env()
        self.rank = dist.rank()
        self.writer = info.local_rank == 0
        self.host = socket.gethostname()
        self.memory_dir = memory_dir
        self.path = tier_path(memory_dir, durable_url, run_id)
        self.owner = {"run": run_id, "durable": durable_url}
        self.auto = every_steps <= 0
        #: the interval (fixed, or ``auto``: 10 until measured, then Young/Daly)
        self.interval = AutoInterval("memory tier: snapshot", every_steps if every_steps > 0
                                     else 10, mtbf_seconds)
        self.check_state, self.check_config = check_state, check_config
        self.local = LocalStorage(self.path)
        self.usable = self._usable()
        self.store = CheckpointStore(self.local, shard_bytes=shard_bytes)
        self.failures = 0
        self.checkpointer = Checkpointer(
            self.store, rank=self.rank, writer=self.writer and self.usable, async_save=True,
            keep_last=SLOTS, max_failed_saves=2**30, gather=self._gather,
            slots=SLOTS, on_saved=self._on_saved, label="memory snapshot")
        self._cost = (0.0, 0.0)
        #: every rank: whether rank 0 wrote the last snapshot with no failure in its streak (a
        #: durable checkpoint of that step can then be persisted from it, see :meth:`persisted`)
        self.persistable = False

    # ------------------------------------------------------------------ ownership and space

    def _usable(self) -> bool:
        """Whether this node can hold snapshots here (a warning, once per node, if not)."""
        why = ""
        if not os.path.isdir(self.memory_dir):
            why = f"{self.memory_dir} is not a directory"
        elif os.path.islink(self.path) or (os.path.exists(self.path)
                                           and not os.path.isdir(self.path)):
            why = f"{self.path} is not a plain directory"
        elif os.path.isdir(self.path) and self._owner() not in (None, self.owner):
            why = f"{self.path} belongs to another run"
        if why and self.writer:
            log.warning("memory tier off on this node (%s): durable checkpoints only", why)
        return not why

    def _owner(self) -> dict[str, Any] | None:
        """What ``owner.json`` says (None: there is none; {}: unreadable, or not an owner)."""
        try:
            owner = load_json(self.local.read(OWNER, limit=4096), OWNER, 4096, max_depth=2)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, InvalidCheckpoint):
            return {}

    def check_space(self, state_bytes: int) -> None:
        """Writer, at start-up: turn the tier off on this node (with a warning) unless the
        memory directory has room for two snapshots of ``state_bytes``. Local."""
        if not (self.writer and self.usable):
            return
        held = sum(i.size for i in self.store.scan() if i.committed) if os.path.isdir(
            self.path) else 0
        free = shutil.disk_usage(self.memory_dir).free + held
        need = int(SLOTS * (state_bytes * MARGIN + OVERHEAD))
        if free < need:
            log.warning("memory tier off on this node: %s has %.0f MB free, two snapshots of "
                        "this state need %.0f MB; durable checkpoints only (give it more: "
                        "docker --shm-size, a Memory emptyDir sizeLimit in Kubernetes, or "
                        "--memory-dir)", self.memory_dir, free / 1e6, need / 1e6)
            self.usable = False
            self.checkpointer.writer = False
            return
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if self._owner() is None:  # create-only and whole (a crash never leaves half of it)
            try:
                self.local.write_new(OWNER, json.dumps(self.owner).encode())
            except FileExistsError:
                pass

    # ------------------------------------------------------------------ saving

    def due(self, step: int, now: float) -> bool:
        """Whether a snapshot is due at ``step`` (same answer on every rank: the interval
        changes only at snapshots, from all-gathered measurements). Local."""
        if self.interval.clock is None:
            self.interval.clock = (now, step)
        return step % self.interval.interval == 0

    def save(self, step: int, shared: dict[str, Any], mine: dict[str, Any], meta: Meta,
             deferrable: list[torch.Tensor], now: float) -> None:
        """Snapshot ``shared`` plus every rank's ``mine`` at ``step`` (asynchronously).
        Collective; with ``auto`` it also re-chooses the interval from every rank's measured
        step time and snapshot stall (Young/Daly)."""
        self._cost = (self.interval.tick(now, step), self.checkpointer.stall_seconds)
        self.checkpointer.save(step, shared, mine, meta, deferrable=deferrable)

    def _gather(self, mine: Any) -> list[Any]:
        """The checkpointer's gather: every rank's per-rank state to every rank, with every
        rank's measurements (which re-choose the ``auto`` interval). Collective."""
        writing = self.writer and self.checkpointer.writer and self.failures == 0
        both = dist.all_gather_objects((mine, self._cost, writing))
        self.choose([cost for _, cost, _ in both])
        self.persistable = bool(both[0][2])
        return [m for m, _, _ in both]

    def choose(self, costs: list[tuple[float, float]]) -> None:
        """Every rank: the ``auto`` interval from every rank's (seconds per step, snapshot
        stall), the slowest rank's of each; the same on every rank."""
        if not self.auto:
            return
        step_s = max((c[0] for c in costs), default=0.0)
        stall = max((c[1] for c in costs), default=0.0)
        if step_s > 0 and stall > 0:
            self.interval.update(stall, step_s, announce=self.rank == 0)

    def _on_saved(self, step: int, seconds: float, nbytes: int,
                  error: BaseException | None) -> None:
        if error is None:
            self.failures = 0
            return
        self.failures += 1
        log.warning("memory snapshot of step %d failed (%s: %s)", step, type(error).__name__,
                    error)
        if self.failures >= 3:
            log.warning("memory tier off on this node after 3 failed snapshots in a row")
            self.checkpointer.writer = False

    def persisted(self, step: int) -> Callable[[], Persisted]:
        """Rank 0, right after :meth:`save` of ``step`` (when :attr:`persistable`): a function
        that waits for that snapshot's commit and opens it (its shard files mapped, not copied)
        for a durable write; it raises CheckpointError if the snapshot did not commit. Called on
        the durable writer's background thread."""
        wait = self.checkpointer.waiter()

        def open_snapshot() -> Persisted:
            wait()
            info = self.store.inspect(step)
            if not info.committed or info.status != "valid" or info.manifest is None:
                raise CheckpointError(f"the memory snapshot of step {step} was not committed "
                                      "(see its warning); nothing to persist")
            skeleton, layout = self.store.layout(info)
            maps: list[mmap.mmap | None] = []
            try:
                for entry in info.manifest.shards:
                    maps.append(self.local.map(f"{info.name}/{entry.name}", entry.size))
            except BaseException:
                _close(maps)
                raise
            views = [memoryview(m) if m is not None else memoryview(b"") for m in maps]
            return Persisted(ViewSource(views), layout, skeleton, info.manifest.meta,
                             [e.checksum for e in info.manifest.shards],
                             lambda: _close(maps),
                             describe(self.host, self.path, info.name))
        return open_snapshot

    # ------------------------------------------------------------------ resuming

    def newest(self) -> Snapshot | None:
        """This node's newest snapshot that verifies and fits (every rank of the node reads it;
        every one skipped is logged by the writer). Local."""
        if not self.usable or not os.path.isdir(self.path) or self._owner() != self.owner:
            return None
        committed = [i for i in self.store.scan() if i.committed]
        for info in reversed(committed):
            try:
                if info.status != "valid" or info.manifest is None:
                    raise CorruptCheckpoint(f"{info.name}: {info.problem}")
                saved = info.manifest.meta.config
                if self.check_config is not None and isinstance(saved, dict):
                    fixed, _ = self.check_config(saved)
                    if fixed:
                        raise InvalidCheckpoint("saved with other settings: " + "; ".join(fixed))
                state = self.store.read(info).state()
                if self.check_state is not None:
                    self.check_state(state)
                return Snapshot(info.step, state, info)
            except (CorruptCheckpoint, InvalidCheckpoint, OSError, ValueError) as exc:
                if self.writer:
                    log.warning("skipping memory snapshot %s/%s: %s", self.path, info.name,
                                str(exc)[:300])
        return None

    def clear(self) -> None:
        """Writer: delete this run's snapshots on this node (the run completed, or the durable
        tier holds everything). Local; never follows a link."""
        self.checkpointer.close()
        if not self.writer or os.path.islink(self.path) or not os.path.isdir(self.path):
            return
        if self._owner() != self.owner:
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """Wait for the snapshot in flight. Local."""
        self.checkpointer.close()


def share(snapshot: Snapshot | None, src: int) -> tuple[dict[str, Any], int]:
    """Every rank returns rank ``src``'s snapshot state and epoch (a broadcast: the ranks of a
    node that has no snapshot get the state from a peer). Collective."""
    header: Any = None
    flat: torch.Tensor | None = None
    if dist.rank() == src:
        assert snapshot is not None
        skeleton, tensors = flatten_state(snapshot.state)
        layout = plan_layout(tensors)
        buffer = FlatBuffer()
        buffer.fill(tensors, layout)
        buffer.ready()
        flat = buffer.data[:layout.total]
        header = (skeleton, layout, snapshot.epoch)
    skeleton, layout, epoch = dist.broadcast_object(header, src=src)
    assert isinstance(layout, Layout)
    flat = dist.broadcast_bytes(flat, layout.total, src)
    return unflatten_state(skeleton, unpack(flat, layout)), int(epoch)


def _close(maps: list[mmap.mmap | None]) -> None:
    """Unmap (a map still exported to a live view is left to the garbage collector)."""
    for m in maps:
        try:
            if m is not None:
                m.close()
        except BufferError:
            pass


def describe(host: str, path: str, name: str) -> str:
    """The source name of snapshot ``name`` in ``path`` on ``host``, in logs and run records."""
    return f"memory:{host}:{path}/{name}"


__all__ = ["DEFAULT_DIR", "MemoryTier", "Snapshot", "describe", "share", "tier_path"]
