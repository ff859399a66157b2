"""Checkpoint policy across ranks: who writes, in the background, what is kept, what is resumed.

All ranks construct a :class:`Checkpointer` and call :meth:`~Checkpointer.save`,
:meth:`~Checkpointer.plan_start` and :meth:`~Checkpointer.load` at the same points (they contain
collectives). Only rank 0 writes. A save gathers every rank's per-rank state to rank 0. An
asynchronous save then copies all tensors into a reusable CPU buffer (the only part the training
thread waits for) and hands the buffer to one background writer thread; a synchronous (blocking)
save writes straight from the tensors' memory, since nothing changes them until it returns. One
save is in flight at a time: a save that comes due while the previous one is still writing waits
for it and logs the wait.

A failed save is logged and training continues from the previous checkpoint; ``max_failed_saves``
consecutive failures make :attr:`Checkpointer.fatal` true (rank 0), which the trainer agrees on
across ranks at the next step boundary and turns into an error.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from distrib import dist
from distrib.checkpoint import (CheckpointError, CheckpointInfo, CheckpointStore,
                                CorruptCheckpoint, LoadedCheckpoint, step_dir)
from distrib.serialization import (ByteSource, FlatBuffer, TensorSource, flatten_state,
                                   plan_layout, unflatten_state)
from distrib.storage import open_storage

log = logging.getLogger(__name__)


@dataclass
class StartPlan:
    """Rank 0's decision at start-up, broadcast to every rank."""

    kind: str  # "fresh" | "resume" | "complete" | "error"
    root: str = ""  # the storage root of the checkpoint to load
    name: str = ""  # its step directory
    message: str = ""
    skipped: list[str] = field(default_factory=list)
    permanent: bool = True  # for errors: retrying the job will not help
    progress: dict[str, Any] | None = None  # the last heartbeat of the interrupted run


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
    scored.sort(key=lambda i: i.metric if mode == "min" else -i.metric)  # type: ignore[operator]
    keep |= {i.step for i in scored[:keep_best]}
    deleted = [i for i in infos if i.step not in keep and i.step < newest]
    return [i for i in infos if i not in deleted], deleted


class Checkpointer:
    """Rank-aware checkpoint writer and loader; see the module docstring."""

    def __init__(self, store: CheckpointStore, *, rank: int, async_save: bool = True,
                 keep_last: int = 3, keep_best: int = 0, mode: str = "min",
                 max_failed_saves: int = 3,
                 on_saved: Callable[[int, float, int, BaseException | None], None] | None = None
                 ) -> None:
        self.store = store
        #: rank 0, training thread: called with (step, seconds, bytes, error or None) once a
        #: save is known to have committed or failed (the run records listen here)
        self.on_saved = on_saved
        self.rank = rank
        self.async_save = async_save
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.max_failed_saves = max_failed_saves
        self.failures = 0
        self.fatal = False
        self.last_saved_step: int | None = None
        self.last_committed_step: int | None = None  # rank 0: newest commit by/for this run
        self.last_save_seconds = 0.0
        self.stall_seconds = 0.0
        self._buffer = FlatBuffer()
        self._thread: threading.Thread | None = None
        self._copied: threading.Event | None = None
        self._progress_thread: threading.Thread | None = None
        self._progress_at = float("-inf")
        self.fence_seconds = 0.0
        self._result: tuple[int, float, int, BaseException | None] | None = None

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: dict[str, Any], per_rank: Any, meta: dict[str, Any],
             *, blocking: bool = False, replace: bool = False, skip_if_committed: bool = False,
             deferrable: Iterable[torch.Tensor] = ()) -> None:
        """Checkpoint ``state`` (identical on all ranks) plus every rank's ``per_rank`` at ``step``.

        Collective: every rank calls it. ``blocking`` waits for the write (end of training,
        preemption); ``replace`` first deletes an existing checkpoint of the same step.
        ``skip_if_committed`` makes it a no-op when this process already committed (or resumed
        from) this very step.
        ``deferrable`` names tensors that stay unchanged until the caller's next :meth:`fence`
        (parameters and optimizer state do, until the next optimizer step): an asynchronous save
        copies those in the background, overlapping the next forward and backward passes.
        """
        gathered = dist.gather_objects(per_rank)
        self.last_saved_step = step  # known on every rank: decisions built on it stay symmetric
        if self.rank != 0:
            return
        started = time.perf_counter()
        self._join(waiting_for=step)
        if skip_if_committed and self.last_committed_step == step:
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
        if replace:
            existing = self.store.inspect(step)
            if existing.committed:
                self.store.delete(existing)
        args = (step, source, layout, skeleton, meta)
        if background:
            self._thread = threading.Thread(target=self._write, args=args,
                                            name=f"distrib-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(*args)
            self._collect()

    def _write(self, step: int, source: ByteSource, layout: Any, skeleton: Any,
               meta: dict[str, Any]) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            try:
                source.prepare()
            finally:
                self._copied.set()  # the training thread may update the weights again
            self.store.write(step, source, layout, skeleton, meta)
            self._prune(step)
        except BaseException as exc:  # reported on the training thread by _collect
            error = exc
        self._result = (step, time.perf_counter() - started, layout.total, error)

    def _prune(self, newest: int) -> None:
        _, deleted = retention(self.store.scan(), self.keep_last, self.keep_best, self.mode)
        for info in deleted:
            self.store.delete(info)
        self.store.collect_orphans(newest)

    def _join(self, waiting_for: int | None = None) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            t0 = time.perf_counter()
            if waiting_for is not None:
                log.info("checkpoint at step %d waits for the save of step %d to finish",
                         waiting_for, self.last_saved_step)
            thread.join()
            if waiting_for is not None:
                log.info("waited %.2fs for the previous save", time.perf_counter() - t0)
        self._thread = None
        self._collect()

    def _collect(self) -> None:
        """Account for a finished write: log it, count failures, set :attr:`fatal`."""
        if self._result is None:
            return
        step, seconds, nbytes, error = self._result
        self._result = None
        self.last_save_seconds = seconds
        if self.on_saved is not None:
            self.on_saved(step, seconds, nbytes, error)
        if error is None:
            self.failures = 0
            self.last_committed_step = step
            log.info("checkpoint step %d saved to %s/%s (%.1f MB in %.2fs)", step,
                     self.store.storage.url, step_dir(step), nbytes / 1e6, seconds)
            return
        self.failures += 1
        log.error("checkpoint step %d failed (%d/%d consecutive): %s: %s", step, self.failures,
                  self.max_failed_saves, type(error).__name__, error)
        if self.failures >= self.max_failed_saves:
            self.fatal = True

    def note_progress(self, step: int, epoch: int, every_s: float = 2.0,
                      reason: str = "running") -> None:
        """Rank 0: record how far training got (at most every ``every_s`` seconds, in the
        background), so that a resume after a crash can tell how many steps were lost.
        ``reason="preempted"`` records, synchronously, that training stopped at ``step``."""
        now = time.monotonic()
        if self.rank != 0:
            return
        if reason != "running":
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
        return self.rank != 0 or self.last_committed_step == step

    def wait(self) -> bool:
        """Wait for the write in flight (rank 0); return :attr:`fatal`."""
        self._join()
        return self.fatal

    # ------------------------------------------------------------------ starting

    def plan_start(self, resume: str, force_restart: bool, storage_options: dict[str, Any]
                   ) -> tuple[StartPlan, LoadedCheckpoint | None]:
        """Decide (on rank 0) how this run starts and broadcast it. Collective.

        Returns the plan and, on rank 0 when resuming, the already verified checkpoint.
        """
        plan, loaded = StartPlan("fresh"), None
        if self.rank == 0:
            try:
                plan, loaded = self._decide(resume, force_restart, storage_options)
            except Exception as exc:  # no collective here: the error travels in the plan
                permanent = isinstance(exc, (PermissionError, ValueError, CheckpointError))
                plan = StartPlan("error", message=f"{self.store.storage.url}: "
                                 f"{type(exc).__name__}: {exc}", permanent=permanent)
        plan = dist.broadcast_object(plan)
        return plan, loaded

    def _decide(self, resume: str, force_restart: bool, options: dict[str, Any]
                ) -> tuple[StartPlan, LoadedCheckpoint | None]:
        if force_restart:
            self._wipe()
            return StartPlan("fresh", message="--force-restart: previous checkpoints deleted"), None
        if resume not in ("auto", "never"):
            return self._decide_explicit(resume, options)
        infos = self.store.scan()
        committed = [i for i in infos if i.committed]
        done = self.store.completion()
        if resume == "never":
            if committed or done is not None:
                return StartPlan("error", message=(
                    f"--resume never: {self.store.storage.url} already holds checkpoints"
                    f"{' of a finished run' if done is not None else ''}; use --force-restart "
                    "to start over")), None
            return StartPlan("fresh"), None
        if done is not None:
            return StartPlan("complete", message=f"run already complete ({done})"), None
        skipped = []
        for info in reversed(committed):
            if info.status != "valid":
                skipped.append(f"{info.name}: {info.problem}")
                continue
            try:
                loaded = self.store.read(info)
            except CorruptCheckpoint as exc:
                skipped.append(str(exc))
                continue
            return StartPlan("resume", self.store.storage.url, info.name, skipped=skipped,
                             progress=self.store.progress()), loaded
        if committed:
            return StartPlan("error", skipped=skipped, message=(
                f"{self.store.storage.url} holds {len(committed)} checkpoint(s) but none is "
                f"valid ({'; '.join(skipped)}); refusing to start fresh over them "
                "(use --force-restart to discard them)")), None
        return StartPlan("fresh"), None

    def _decide_explicit(self, url: str, options: dict[str, Any]
                         ) -> tuple[StartPlan, LoadedCheckpoint | None]:
        root, _, name = url.rstrip("/").rpartition("/")
        store = CheckpointStore(open_storage(root or ".", options))
        match = name.startswith("step-") and name[5:].isdigit()
        info = store.inspect(int(name[5:]), name) if match else None
        if info is None or info.status != "valid":
            why = info.problem if info else "not a step-N checkpoint directory"
            return StartPlan("error", message=f"--resume {url}: {why}"), None
        return StartPlan("resume", store.storage.url, name), store.read(info)

    def _wipe(self) -> None:
        infos = self.store.scan()
        for info in infos:
            self.store.delete(info)
        self.store.collect_orphans(2**62)
        self.store.clear_complete()
        if infos:
            log.warning("--force-restart: deleted %d checkpoint(s) in %s", len(infos),
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
                loaded = store.read(info)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if dist.any_rank(bool(error)):
            raise CheckpointError(f"not every rank could read {plan.root}/{plan.name} (is the "
                                  "checkpoint directory on storage every node can reach?)"
                                  + (f": {error}" if error else ""))
        assert loaded is not None
        self.last_committed_step = loaded.info.step
        return unflatten_state(loaded.skeleton, loaded.tensors), loaded.info
