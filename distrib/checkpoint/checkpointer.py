"""Checkpoint policy across ranks: who writes, in the background, what is kept, what is resumed.

All ranks construct a :class:`Checkpointer` and call :meth:`~Checkpointer.save`,
:meth:`~Checkpointer.plan_start` and :meth:`~Checkpointer.load` at the same points (they contain
collectives). Only rank 0 writes. A save gathers every rank's per-rank state to rank 0. An
asynchronous save then copies all tensors into a reusable CPU buffer (the only part the training
thread waits for) and hands the buffer to one background writer thread; a synchronous (blocking)
save writes straight from the tensors' memory, since nothing changes them until it returns. One
save is in flight at a time: a save that comes due while the previous one is still writing waits
for it and logs the wait.

A save that does not commit is logged and training continues from the previous checkpoint;
``max_failed_saves`` consecutive ones make :attr:`Checkpointer.fatal` true (rank 0), which the
trainer agrees on across ranks at the next step boundary and turns into an error. A save that
commits resets the count; trouble after the commit (retention, listing) is only a warning.

Start-up (:meth:`Checkpointer.plan_start`): rank 0 takes the directory's lease (see
:mod:`distrib.checkpoint.lease`), then tries the committed checkpoints newest first. Each must be valid on
storage, read back with every checksum and the tensor layout verified, and pass the caller's
``check_state`` (the loaded state fits the live model and optimizer); the first that does is
used, every one skipped is named. The configuration it was saved with is compared with this
run's (``check_config``): options that shape the model, the data, the optimizer or the seed
must match unless ``allow_config_change``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

import torch

from distrib.checkpoint.format import InvalidCheckpoint, Meta
from distrib.checkpoint.lease import Lease, LeaseHeld
from distrib.checkpoint.serialization import (
    ByteSource,
    FlatBuffer,
    Layout,
    TensorSource,
    flatten_state,
    plan_layout,
)
from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import (
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    CorruptCheckpoint,
    LoadedCheckpoint,
    step_dir,
)
from distrib.runtime import dist

log = logging.getLogger(__name__)

#: "memory": resume from the memory tier's snapshot of step ``memory_step`` (no durable read)
PlanKind = Literal["fresh", "resume", "memory", "complete", "error"]
#: (saved configuration) -> (options that must match but differ, options that differ harmlessly)
ConfigCheck = Callable[[Mapping[str, Any]], tuple[list[str], list[str]]]


@dataclass
class StartPlan:
    """Rank 0's decision at start-up, broadcast to every rank."""

    kind: PlanKind
    root: str = ""  # the storage root of the checkpoint to load
    name: str = ""  # its step directory ("" for a complete run whose checkpoints are gone)
    message: str = ""
    skipped: list[str] = field(default_factory=list)
    permanent: bool = True  # for errors: retrying the job will not help
    progress: dict[str, Any] | None = None  # the last heartbeat of the interrupted run
    notes: list[str] = field(default_factory=list)  # warnings for the log
    changes: list[str] = field(default_factory=list)  # options that changed since the checkpoint


@dataclass
class Persisted:
    """A committed checkpoint's bytes, opened for writing elsewhere (:meth:`Checkpointer.save_from`):
    its stream, layout, skeleton and metadata, and its shards' checksums, which the copy must
    reproduce. ``close`` releases the source."""

    source: ByteSource
    layout: Layout
    skeleton: Any
    meta: Meta
    checksums: list[str]
    close: Callable[[], None]
    origin: str  # where the bytes are, for the log


def retention(infos: list[CheckpointInfo], keep_last: int, keep_best: int,
              mode: str) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
    """Split checkpoints into (kept, deleted): the newest ``keep_last`` valid ones, the
    ``keep_best`` valid ones with the best metric, never the newest; everything that is not valid
    and older than the newest valid one is deleted."""
    valid = [i for i in infos if i.status == "valid"]
    if not valid:
        return infos, []
    newest = max(i.step for i in valid)
    keep = {i.step for i in sorted(valid, key=lambda i: i.step)[-max(1, keep_last):]}
    scored = [i for i in valid if i.metric is not None]
    scored.sort(key=lambda i: float(i.metric or 0.0) if mode == "min" else -float(i.metric or 0.0))
    keep |= {i.step for i in scored[:keep_best]}
    deleted = [i for i in infos if i.step not in keep and i.step < newest]
    return [i for i in infos if i not in deleted], deleted


class Checkpointer:
    """Rank-aware checkpoint writer and loader; see the module docstring.

    Args:
        store: where the checkpoints live.
        rank: this process's rank (0 writes).
        check_state: called on rank 0 with a loaded state before it is used; raises
            :class:`~distrib.checkpoint.format.InvalidCheckpoint` if the state does not fit (the checkpoint
            is then skipped like a damaged one).
        check_config: compares a checkpoint's saved configuration with this run's.
        allow_config_change: resume even if ``check_config`` finds options that must match.
        lease: this run's lease on the directory (taken at :meth:`plan_start`, released by
            :meth:`close`); None for no lease.
        writer: whether this process writes (default: rank 0). The memory tier has one writer
            per node.
        gather: how every rank's per-rank state reaches the writers (default: gathered to rank
            0; the memory tier all-gathers it, so that every node holds all of it).
        slots: at most this many checkpoints on storage at any time, counting the one being
            written: older ones are deleted before a write starts (the memory tier's two
            alternating slots); None: retention by ``keep_last``/``keep_best`` after a commit.
        live: the live objects' current state, shaped like a saved state: a resume reads the
            checkpoint's tensors straight into its matching CPU tensors (no allocation; see
            :meth:`~distrib.checkpoint.store.CheckpointStore.read`). Used only where a read that
            fails is followed by a full load of another checkpoint or by an error, never by a
            fresh start over half-loaded objects.
    """

    def __init__(self, store: CheckpointStore, *, rank: int, async_save: bool = True,
                 keep_last: int = 3, keep_best: int = 0, mode: str = "min",
                 max_failed_saves: int = 3,
                 on_saved: Callable[[int, float, int, BaseException | None], None] | None = None,
                 check_state: Callable[[Any], None] | None = None,
                 check_config: ConfigCheck | None = None, allow_config_change: bool = False,
                 lease: Lease | None = None, writer: bool | None = None,
                 gather: Callable[[Any], list[Any] | None] = dist.gather_objects,
                 slots: int | None = None, label: str = "checkpoint",
                 live: Callable[[], Any] | None = None) -> None:
        self.store = store
        self.live = live
        self.writer = rank == 0 if writer is None else writer
        self.gather = gather
        self.slots = slots
        self.label = label
        #: rank 0, training thread: called with (step, seconds, bytes, error or None) once a
        #: save is known to have committed or failed (the run records listen here)
        self.on_saved = on_saved
        self.rank = rank
        self.async_save = async_save
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.max_failed_saves = max_failed_saves
        self.check_state = check_state
        self.check_config = check_config
        self.allow_config_change = allow_config_change
        self.lease = lease
        self.failures = 0
        self.last_saved_step: int | None = None
        self.last_committed_step: int | None = None  # rank 0: newest commit by/for this run
        self.last_save_seconds = 0.0
        self.stall_seconds = 0.0
        self.fence_seconds = 0.0
        self._invalid_steps: set[int] = set()  # rank 0: committed here but unusable: replace
        self._buffer = FlatBuffer()
        self._thread: threading.Thread | None = None
        self._in_flight: int | None = None
        self._copied: threading.Event | None = None
        self._progress_thread: threading.Thread | None = None
        self._progress_at = float("-inf")
        self._result: tuple[int, float, int, BaseException | None] | None = None

    @property
    def fatal(self) -> bool:
        """Rank 0: the last ``max_failed_saves`` saves all failed to commit."""
        return self.failures >= self.max_failed_saves

    @property
    def lease_lost(self) -> bool:
        """Rank 0: another run took over the directory's lease (stop writing)."""
        return self.lease is not None and self.lease.lost

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: dict[str, Any], per_rank: Any,
             meta: Meta | Mapping[str, Any],
             *, blocking: bool = False, replace: bool = False, skip_if_committed: bool = False,
             deferrable: Iterable[torch.Tensor] = ()) -> None:
        """Checkpoint ``state`` (identical on all ranks) plus every rank's ``per_rank`` at ``step``.

        Collective: every rank calls it. ``blocking`` waits for the write (end of training,
        preemption); ``replace`` replaces a valid checkpoint of the same step (an invalid one is
        always replaced). ``skip_if_committed`` makes it a no-op when this process already
        committed (or resumed from) this very step.
        ``deferrable`` names tensors that stay unchanged until the caller's next :meth:`fence`
        (parameters and optimizer state do, until the next optimizer step): an asynchronous save
        copies those in the background, overlapping the next forward and backward passes.
        """
        gathered = self.gather(per_rank)
        self.last_saved_step = step  # known on every rank: decisions built on it stay symmetric
        if not self.writer:
            return
        started = time.perf_counter()
        if not self._ready(step, skip_if_committed):
            return
        skeleton, tensors = flatten_state({**state, "per_rank": gathered})
        layout = plan_layout(tensors)
        background = self.async_save and not blocking
        source: ByteSource
        if background:  # training goes on: snapshot into the buffer (deferrable ones later)
            ptrs = {t.data_ptr() for t in deferrable if t.numel()}
            self._buffer.fill(tensors, layout, (lambda t: t.data_ptr() in ptrs) if ptrs else None)
            source = self._buffer
        else:  # nothing changes until the write returns: write from the tensors themselves
            source = TensorSource(tensors, layout)
        self._copied = threading.Event()
        self.stall_seconds = time.perf_counter() - started
        replace = replace or step in self._invalid_steps
        copied = self._copied

        def write() -> int:
            try:
                source.prepare()
            finally:
                copied.set()  # the training thread may update the weights again
            if self.slots is not None:
                self._make_room()
            self.store.write(step, source, layout, skeleton, meta, replace=replace)
            return int(layout.total)
        self._start(step, write, background)

    def save_from(self, step: int, persisted: Callable[[], Persisted]) -> None:
        """Checkpoint ``step`` from bytes that already exist outside the training state: the
        memory tier's committed snapshot of this very step (``persisted`` waits for it and opens
        it, on the writer's background thread). The training thread copies nothing and gathers
        nothing (the snapshot holds every rank's state); the written files' checksums must equal
        the snapshot's. Every rank calls it (the same bookkeeping everywhere); no collective."""
        self.last_saved_step = step
        if not self.writer:
            return
        started = time.perf_counter()
        if not self._ready(step, False):
            return
        self._copied = threading.Event()
        self._copied.set()  # nothing of the live state is read
        self.stall_seconds = time.perf_counter() - started
        replace = step in self._invalid_steps

        def write() -> int:
            source = persisted()
            try:
                self.store.write(step, source.source, source.layout, source.skeleton,
                                 source.meta, replace=replace, expected=source.checksums)
            finally:
                source.close()
            log.debug("%s step %d persisted from %s", self.label, step, source.origin)
            return int(source.layout.total)
        self._start(step, write, self.async_save)

    def waiter(self) -> Callable[[], None]:
        """A function that waits, from any thread, for the write in flight now (if any)."""
        thread = self._thread
        return thread.join if thread is not None else (lambda: None)

    def _ready(self, step: int, skip_if_committed: bool) -> bool:
        """Writer: wait for the write in flight; whether ``step`` is to be written now (not when
        it is committed already and ``skip_if_committed``, nor when the lease was lost)."""
        self._join(waiting_for=step)
        if skip_if_committed and self.last_committed_step == step:
            return False
        if self.lease_lost:
            self._result = (step, 0.0, 0, CheckpointError("the directory's lease was lost"))
            self._collect()
            return False
        return True

    def _start(self, step: int, write: Callable[[], int], background: bool) -> None:
        """Run ``write`` (which returns the bytes written) on a background thread, or here."""
        self._in_flight = step
        if background:
            self._thread = threading.Thread(target=self._write, args=(step, write),
                                            name=f"distrib-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(step, write)
            self._collect()

    def _write(self, step: int, write: Callable[[], int]) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        nbytes = 0
        try:
            nbytes = write()
        except BaseException as exc:  # reported on the training thread by _collect
            error = exc
        seconds = time.perf_counter() - started
        if error is None:
            self._invalid_steps.discard(step)
            try:  # committed: trouble from here on does not make the save a failure
                self._prune(step)
            except Exception as exc:
                log.warning("checkpoint step %d is committed, but removing older checkpoints "
                            "failed (%s: %s); they are retried after the next save", step,
                            type(exc).__name__, exc)
        self._result = (step, seconds, nbytes, error)

    def _prune(self, newest: int) -> None:
        _, deleted = retention(self.store.scan(), self.keep_last, self.keep_best, self.mode)
        for info in deleted:
            self.store.delete(info)
        self.store.collect_orphans(newest)

    def _make_room(self) -> None:
        """Delete all but the newest ``slots - 1`` valid checkpoints (and everything invalid)
        before a write, so the write never holds more than ``slots`` on storage."""
        assert self.slots is not None
        infos = self.store.scan()
        valid = [i for i in infos if i.committed and i.status == "valid"]
        keep = {i.name for i in valid[len(valid) - (self.slots - 1):]} if self.slots > 1 else set()
        for info in infos:
            if info.name not in keep and info.committed:
                self.store.delete(info)
        self.store.collect_orphans(2**62)

    def _join(self, waiting_for: int | None = None) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            t0 = time.perf_counter()
            if waiting_for is not None:
                log.info("checkpoint at step %d waits for the save of step %d to finish",
                         waiting_for, self._in_flight)
            thread.join()
            if waiting_for is not None:
                log.info("waited %.2fs for the previous save", time.perf_counter() - t0)
        self._thread = None
        self._collect()

    def _collect(self) -> None:
        """Account for a finished write: log it, count failures (see :attr:`fatal`)."""
        if self._result is None:
            return
        step, seconds, nbytes, error = self._result
        self._result = None
        self._in_flight = None
        self.last_save_seconds = seconds
        if self.on_saved is not None:
            self.on_saved(step, seconds, nbytes, error)
        if error is None:
            self.failures = 0
            self.last_committed_step = step
            log.log(logging.INFO if self.label == "checkpoint" else logging.DEBUG,
                    "%s step %d saved to %s/%s (%.1f MB in %.2fs)", self.label, step,
                    self.store.storage.url, step_dir(step), nbytes / 1e6, seconds)
            return
        self.failures += 1
        if self.label == "checkpoint":
            log.error("checkpoint step %d failed (%d/%d consecutive): %s: %s", step,
                      self.failures, self.max_failed_saves, type(error).__name__, error)

    def note_progress(self, step: int, epoch: int, every_s: float = 2.0,
                      reason: str = "running") -> None:
        """Rank 0: record how far training got (at most every ``every_s`` seconds, in the
        background), so that a resume after a crash can tell how many steps were lost.
        ``reason`` other than "running" ("preempted", "finished") is recorded synchronously."""
        now = time.monotonic()
        if self.rank != 0:
            return
        if reason != "running":
            self._join_progress()
            self.store.write_progress({"step": step, "epoch": epoch, "time": time.time(),
                                       "reason": reason})
            return
        if now - self._progress_at < every_s:
            return
        if self._progress_thread is not None and self._progress_thread.is_alive():
            return
        self._progress_at = now

        def write() -> None:
            try:
                self.store.write_progress({"step": step, "epoch": epoch, "time": time.time(),
                                           "reason": "running"})
            except Exception as exc:  # a missed heartbeat only makes a log line less precise
                log.debug("progress heartbeat failed: %s", exc)
        self._progress_thread = threading.Thread(target=write, name="distrib-progress",
                                                 daemon=True)
        self._progress_thread.start()

    def _join_progress(self) -> None:
        if self._progress_thread is not None:
            self._progress_thread.join()
            self._progress_thread = None

    def fence(self) -> None:
        """Wait until the tensors deferred by the last :meth:`save` are copied. Call before
        changing them (before ``optimizer.step()``). Local, cheap when nothing is pending."""
        copied = self._copied
        if copied is not None and not copied.is_set():
            t0 = time.perf_counter()
            copied.wait()
            self.fence_seconds += time.perf_counter() - t0

    def poll(self) -> bool:
        """Rank 0: account for a finished background write; return :attr:`fatal`. Never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._join()
        return self.fatal

    def committed(self, step: int) -> bool:
        """Whether checkpoint ``step`` is committed (by this run, or resumed from). Rank 0 knows;
        other ranks return True, so ``dist.any_rank(not committed)`` is the job-wide answer."""
        return not self.writer or self.last_committed_step == step

    def wait(self) -> bool:
        """Wait for the write in flight (rank 0); return :attr:`fatal`."""
        self._join()
        return self.fatal

    def close(self) -> None:
        """Writers: wait for the writers, then release the lease. Local; safe to call twice."""
        if not self.writer:
            return
        try:
            self._join()
            self._join_progress()
        finally:
            if self.lease is not None:
                self.lease.release()

    # ------------------------------------------------------------------ starting

    def plan_start(self, resume: str, force_restart: bool, storage_options: dict[str, Any],
                   memory_step: int = -1) -> tuple[StartPlan, LoadedCheckpoint | None]:
        """Decide (on rank 0) how this run starts and broadcast it. Collective.

        ``memory_step``: the newest usable memory-tier snapshot on any node (-1: none); a
        durable checkpoint is read only if it is newer. Returns the plan and, on rank 0 when
        resuming from durable storage, the already verified checkpoint.
        """
        plan, loaded = StartPlan("fresh"), None
        if self.rank == 0:
            try:
                plan, loaded = self._decide(resume, force_restart, storage_options, memory_step)
            except LeaseHeld as exc:
                plan = StartPlan("error", message=str(exc))
            except Exception as exc:  # no collective here: the error travels in the plan
                permanent = isinstance(exc, (PermissionError, ValueError, CheckpointError))
                plan = StartPlan("error", message=f"{self.store.storage.url}: "
                                 f"{type(exc).__name__}: {exc}", permanent=permanent)
        plan = dist.broadcast_object(plan)
        return plan, loaded

    def _decide(self, resume: str, force_restart: bool, options: dict[str, Any],
                memory_step: int = -1) -> tuple[StartPlan, LoadedCheckpoint | None]:
        if self.lease is not None:
            self.lease.acquire()
            self.lease.start_heartbeat()
        if force_restart:
            self._wipe()
            return StartPlan("fresh", message="--force-restart: previous checkpoints deleted"), None
        committed = [i for i in self.store.scan() if i.committed]
        notes = []
        if resume not in ("auto", "never"):
            if not committed and memory_step < 0:
                return self._decide_explicit(resume, options)
            notes.append(f"--resume {resume} is not used: {self.store.storage.url} already "
                         "holds this run's checkpoints, which continue it")
        done = self.store.completion()
        if resume == "never" and (committed or done is not None):
            return StartPlan("error", message=(
                f"--resume never: {self.store.storage.url} already holds checkpoints"
                f"{' of a finished run' if done is not None else ''}; use --force-restart "
                "to start over")), None
        plan, loaded = self._pick(committed, done, -1 if resume == "never" else memory_step)
        plan.notes[:0] = notes
        return plan, loaded

    def _pick(self, committed: list[CheckpointInfo], done: dict[str, Any] | None,
              memory_step: int = -1) -> tuple[StartPlan, LoadedCheckpoint | None]:
        """The newest committed checkpoint that loads and fits, newest first; the memory
        tier's snapshot instead when it is at least as new (and the run is not complete)."""
        url = self.store.storage.url
        skipped: list[str] = []
        use_memory = done is None and memory_step >= 0
        # a failed read into the live objects is followed by another one or an error, unless
        # the memory tier's snapshot (loaded afterwards from its own tensors) is the fallback
        into = self._live() if memory_step < 0 else None
        memory = StartPlan("memory", "memory", step_dir(max(memory_step, 0)), skipped=skipped)
        for info in reversed(committed):
            if use_memory and info.step <= memory_step:
                break
            if info.status != "valid" or info.manifest is None:
                skipped.append(f"{info.name}: {info.problem}")
                self._invalid_steps.add(info.step)
                continue
            error, notes, changes = self._compare(info.manifest.meta.config,
                                                  f"{url}/{info.name}")
            if error:
                return StartPlan("error", message=error, skipped=skipped), None
            try:
                loaded = self.store.read(info, into=into)
                if self.check_state is not None:
                    self.check_state(loaded.state())
            except (CorruptCheckpoint, InvalidCheckpoint) as exc:
                text = str(exc)
                skipped.append(text if text.startswith(info.name) else f"{info.name}: {text}")
                self._invalid_steps.add(info.step)
                continue
            complete = done is not None and done.get("step", info.step) == info.step
            if done is not None and not complete:
                notes.append(f"the run finished at step {done.get('step')}, but that "
                             f"checkpoint cannot be used: continuing from {info.name} to "
                             "rebuild it")
            return StartPlan("complete" if complete else "resume", url, info.name,
                             message=f"run already complete ({_describe(done)})"
                             if complete else "", skipped=skipped,
                             progress=self.store.progress(), notes=notes, changes=changes), loaded
        if use_memory:
            memory.progress = self.store.progress()
            return memory, None
        if committed:
            return StartPlan("error", skipped=skipped, message=(
                f"{url} holds {len(committed)} checkpoint(s) but none can be used "
                f"({'; '.join(skipped)}); refusing to start fresh over them "
                "(use --force-restart to discard them)")), None
        if done is not None:
            error, notes, changes = self._compare(done.get("config"), f"{url}/COMPLETE")
            if error:
                return StartPlan("error", message=error), None
            return StartPlan("complete", message=f"run already complete ({_describe(done)}; "
                             "its checkpoints are gone)", notes=notes, changes=changes), None
        return StartPlan("fresh"), None

    def _compare(self, saved: Any, where: str) -> tuple[str, list[str], list[str]]:
        """(an error message or "", warnings, changed options) for resuming from a checkpoint
        saved with configuration ``saved``."""
        if self.check_config is None or not isinstance(saved, dict):
            return "", [], []
        fixed, logged = self.check_config(saved)
        if fixed and not self.allow_config_change:
            return (f"{where} was saved with other settings: {'; '.join(fixed)}. These shape "
                    "the model, the data, the optimizer or the seed: resume with the original "
                    "values, pass --allow-config-change to resume anyway, or start over with "
                    "another --checkpoint-dir or --force-restart (deletes the checkpoints)"), [], []
        warnings = [f"resuming with other settings than the checkpoint's "
                    f"(--allow-config-change): {'; '.join(fixed)}"] if fixed else []
        return "", warnings, logged

    def _decide_explicit(self, url: str, options: dict[str, Any]
                         ) -> tuple[StartPlan, LoadedCheckpoint | None]:
        root, _, name = url.rstrip("/").rpartition("/")
        store = CheckpointStore(open_storage(root or ".", options))
        match = name.startswith("step-") and name[5:].isdigit()
        info = store.inspect(int(name[5:]), name) if match else None
        if info is None or info.status != "valid" or info.manifest is None:
            why = info.problem if info else "not a step-N checkpoint directory"
            return StartPlan("error", message=f"--resume {url}: {why}"), None
        error, notes, changes = self._compare(info.manifest.meta.config, url)
        if error:
            return StartPlan("error", message=error), None
        try:  # a failure is an error: reading into the live objects is safe
            loaded = store.read(info, into=self._live())
            if self.check_state is not None:
                self.check_state(loaded.state())
        except (CorruptCheckpoint, InvalidCheckpoint) as exc:
            return StartPlan("error", message=f"--resume {url}: {exc}"), None
        return StartPlan("resume", store.storage.url, name, notes=notes, changes=changes), loaded

    def _live(self) -> Any:
        """The live objects' state to read a checkpoint into (None: read into new tensors)."""
        return self.live() if self.live is not None else None

    def _wipe(self) -> None:
        infos = self.store.scan()
        deleted = sum(self.store.delete(info) for info in infos)
        self.store.collect_orphans(2**62)
        self.store.clear_complete()
        if infos:
            log.warning("--force-restart: deleted %d checkpoint(s) in %s", deleted,
                        self.store.storage.url)

    def load(self, plan: StartPlan, preloaded: LoadedCheckpoint | None,
             storage_options: dict[str, Any]) -> tuple[dict[str, Any], CheckpointInfo]:
        """Every rank reads the planned checkpoint (rank 0 reuses its verified copy). Collective:
        if any rank fails to read it, every rank raises CheckpointError."""
        loaded, error = preloaded, ""
        if loaded is None:
            try:
                store = (self.store if plan.root == self.store.storage.url
                         else CheckpointStore(open_storage(plan.root, storage_options)))
                info = store.inspect(int(plan.name[5:]), plan.name)
                # a failure is an error on every rank: reading into the live objects is safe
                loaded = store.read(info, into=self._live())
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if dist.any_rank(bool(error)):
            raise CheckpointError(f"not every rank could read {plan.root}/{plan.name} (is the "
                                  "checkpoint directory on storage every node can reach?)"
                                  + (f": {error}" if error else ""))
        assert loaded is not None
        if plan.root == self.store.storage.url:  # a checkpoint elsewhere is not committed here
            self.last_committed_step = loaded.info.step
        return loaded.state(), loaded.info


def _describe(done: Mapping[str, Any] | None) -> str:
    """The COMPLETE marker in words (it may come from an older distrib: any of its keys)."""
    if not done:
        return "unknown"
    parts = [f"{key} {done[key]}" for key in ("step", "epoch", "reason") if key in done]
    return ", ".join(parts) or "unknown"


def replay_note(plan: StartPlan, marker: dict[str, Any] | None, step: int) -> str:
    """How much of the interrupted launch a resume at ``step`` replays, for the resume log line
    ("; ... N steps are replayed", "no steps are lost", "the run is complete", or ""): from the
    run records' ``resume`` marker, or else the checkpoint heartbeat, whichever got further."""
    progress = plan.progress or {}
    reached = int(marker["last_step"]) if marker else int(progress.get("step", -1))
    if plan.kind == "complete":
        return "; the run is complete"
    if reached > step:
        return (f"; the interrupted run had reached step {reached} at least, so "
                f"{reached - step} steps are replayed")
    if reached == step and progress.get("reason") == "preempted":
        return "; it was written at a preemption notice, so no steps are lost"
    return ""
