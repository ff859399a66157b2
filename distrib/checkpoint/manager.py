"""Fault tolerance for any training loop: :class:`CheckpointManager`.

Register the live objects once; the manager builds every checkpoint from them, restores them on
resume, and handles everything that keeps a job alive through preemption and failure::

    ckpt = CheckpointManager("runs/exp1", {"model": model, "optimizer": optimizer},
                             save_every_steps=100)
    start = ckpt.resume()                    # every rank: loads the newest checkpoint that fits
    for step in range(start.step, max_steps):
        ...                                  # forward, backward, optimizer.step()
        ckpt.step_done(step + 1)             # saves when due; on preemption saves and raises
    ckpt.finish(max_steps)                   # the final checkpoint and the COMPLETE marker

What it does, and which ranks must call what: every method is **collective** (all ranks call it,
in the same order) except :meth:`fence` and the properties.

* **What is saved.** Each registered object's ``state_dict()`` (modules through the strategy,
  unwrapped from DDP and ``torch.compile``; optimizers, LR schedulers, grad scalers, samplers,
  data loaders and anything else with ``state_dict()``/``load_state_dict()``), plus every rank's
  RNG states (torch CPU and CUDA, numpy, Python) and the state of the objects registered as
  per-rank (data loaders and samplers by default, see ``per_rank``), gathered to the writer.
* **Resume.** The newest committed checkpoint that verifies *and fits* every registered object
  (keys, shapes, dtypes, optimizer groups, a restorable RNG) is loaded into them; every one
  skipped is named. A checkpoint directory that holds checkpoints none of which can be used is a
  :class:`~distrib.checkpoint.store.CheckpointError`, never a silent fresh start.
* **Asynchronous saves without a fence to forget.** Parameters of the registered optimizers and
  their state are copied in the background while the next forward and backward passes run; the
  manager hooks each registered optimizer's ``step()`` so that it waits for that copy first.
  Everything else is copied before :meth:`step_done` returns.
* **Preemption.** While the manager is open it handles SIGTERM and SIGUSR1 (only setting a flag;
  ``handle_signals=False`` leaves signals to you, then call :meth:`request_stop`). The ranks agree
  on the flag within about half a second without a per-step collective, write an emergency
  checkpoint of the last completed step, and :meth:`step_done` raises
  :class:`~distrib.runtime.preemption.Preempted` on every rank (``exit_code`` turns it into 75).
* **Saves that keep failing** end the job (``max_failed_saves`` in a row: SaveFailedError on every
  rank); trouble after a commit is a warning. The directory is leased to one run at a time.
* **Finished runs.** :meth:`finish` writes the final checkpoint and ``COMPLETE``; a relaunch then
  gets ``complete=True`` from :meth:`resume` (the objects hold the final state) and can return.
* **Records.** Rank 0 keeps the run records (start, resume, checkpoints, end, and whatever
  :meth:`log` adds) that ``python -m distrib.report`` reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from distrib.checkpoint.checkpointer import Checkpointer, ConfigCheck, StartPlan, replay_note
from distrib.checkpoint.format import InvalidCheckpoint, Meta, Metric
from distrib.checkpoint.interval import AutoInterval
from distrib.checkpoint.lease import Lease, run_identity
from distrib.checkpoint.memory import (
    DEFAULT_DIR,
    MemoryTier,
    Snapshot,
    describe,
    share,
)
from distrib.checkpoint.serialization import flatten_state, plan_layout
from distrib.checkpoint.statecheck import check_like, check_optimizer, check_rng
from distrib.checkpoint.storage import open_storage, parse_options
from distrib.checkpoint.store import CheckpointError, CheckpointStore, SaveFailedError, step_dir
from distrib.records.events import RunRecords, default_log_dir, estimate_mtbf
from distrib.runtime import dist
from distrib.runtime.preemption import Preempted, PreemptionHandler, shutdown_budget_problems
from distrib.runtime.rng import capture_rng, restore_rng
from distrib.runtime.strategy import DDPStrategy, Strategy

log = logging.getLogger(__name__)

RNG = "rng"  # the per-rank key of every rank's RNG states
AUTO_FIRST = 10  # save_every_steps="auto": the interval until a save's cost is measured


@runtime_checkable
class Stateful(Protocol):
    """What the manager saves: torch's and torchdata's protocol."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class Resume:
    """Where a loop continues (the same on every rank)."""

    step: int  # the optimizer step of the loaded checkpoint (0: a fresh start)
    epoch: int  # the epoch the manager was told at that save (0 when never told)
    complete: bool  # the run had finished: the objects hold its final state
    source: str | None  # the checkpoint loaded, or None
    skipped: tuple[str, ...] = ()  # checkpoints that could not be used, with the reason
    saved_at: float | None = None  # when the loaded checkpoint was written (Unix time)
    note: str = ""  # how much of the interrupted launch is replayed (see replay_note)
    message: str = ""  # what start-up found (e.g. "run already complete (...)"), if anything


def _per_rank_by_default(obj: object) -> bool:
    """Data position is each rank's own: samplers, data loaders and iterable datasets."""
    from torch.utils.data import DataLoader, IterableDataset, Sampler

    return isinstance(obj, (DataLoader, Sampler, IterableDataset)) or \
        type(obj).__name__ == "StatefulDataLoader"


@dataclass
class _Policy:
    save_every_steps: int = 0  # the interval now (auto: chosen at each save)
    save_every_epochs: int = 0
    config: Mapping[str, Any] | None = None


class CheckpointManager:
    """Fault tolerance for a training loop; see the module docstring.

    Args:
        directory: where checkpoints go: a local path or an fsspec URL (``s3://bucket/run``).
        state: the live objects to save and restore, by name (the one named ``"model"`` is what
            ``python -m distrib.ckpt export`` exports).
        per_rank: names in ``state`` whose state differs per rank (default: the data loaders,
            samplers and iterable datasets among them).
        save_every_steps, save_every_epochs: periodic saves (0: off); :meth:`finish` always saves.
            ``save_every_steps="auto"``: the interval that minimises expected lost work plus
            checkpoint overhead (Young/Daly), re-chosen at every save from the measured save
            cost and step time and the time between failures (``mtbf_seconds``, combined with
            the failures the run records show); each change is logged with its numbers.
        keep_last, keep_best, mode: retention (``keep_best`` by the metric given to the saves).
        async_save: write in the background after an in-memory snapshot.
        config: the run's settings (JSON-able), saved in every manifest and compared on resume:
            differences are logged, or judged by ``check_config``.
        check_config: ``(saved settings) -> (must-match differences, logged differences)``;
            must-match ones refuse the checkpoint unless ``allow_config_change``.
        log_dir: run records (default ``<directory>/logs``; None: none).
        handle_signals: handle SIGTERM and SIGUSR1 as preemption notices while open.
        strategy: how modules are wrapped and who writes (DDP by default).
        storage_options: fsspec options for ``directory`` and ``log_dir``.
        samples_per_step: samples per optimizer step over all ranks (run records' throughput).
        preemption: a handler the caller installed already (its flag is the notice; the
            manager then installs none, whatever ``handle_signals`` says).
        config_fingerprint: a digest of ``config``'s must-match part, saved in the manifests.
        log_progress: log the resume line and the first step (off for a caller that logs its
            own).
        memory_every_steps: the memory tier (:mod:`distrib.checkpoint.memory`): a snapshot in
            node-local shared memory every N optimizer steps (0: ``auto``, chosen by Young/Daly
            from the measured snapshot cost and ``mtbf_seconds``; None: off). Resume then takes
            the newest state of any tier and node; durable storage is read only when no node
            has a usable snapshot at least as new.
        memory_dir: the node-local tmpfs directory of the memory tier.
        mtbf_seconds: the expected time between failures, for ``auto`` intervals (combined with
            the failures this run's records show: see
            :func:`~distrib.records.events.estimate_mtbf`).

    Objects registered as per-rank may define ``check_rank_states(states)`` and
    ``load_rank_states(states, rank, world)`` to see every rank's saved entry at once (to check
    them against each other, or to merge them when the world size changed).
    """

    def __init__(self, directory: str, state: Mapping[str, Any], *,
                 per_rank: Iterable[str] | None = None,
                 save_every_steps: int | Literal["auto"] = 0,
                 save_every_epochs: int = 0, keep_last: int = 3, keep_best: int = 0,
                 mode: str = "min", async_save: bool = True, shard_size_mb: float = 256.0,
                 max_failed_saves: int = 3, lease_timeout: float = 60.0,
                 resume: str = "auto", force_restart: bool = False,
                 config: Mapping[str, Any] | None = None, check_config: ConfigCheck | None = None,
                 allow_config_change: bool = False, log_dir: str | None = "",
                 tensorboard: bool = False, handle_signals: bool = True,
                 strategy: Strategy | None = None,
                 storage_options: Mapping[str, Any] | None = None, samples_per_step: int = 0,
                 preemption: PreemptionHandler | None = None,
                 config_fingerprint: str | None = None, log_progress: bool = True,
                 memory_every_steps: int | None = None, memory_dir: str = DEFAULT_DIR,
                 mtbf_seconds: float = 4 * 3600.0) -> None:
        for name, obj in state.items():
            if not isinstance(obj, Stateful):
                raise TypeError(f"state[{name!r}] has no state_dict()/load_state_dict()")
        self.objects = dict(state)
        ranked = set(per_rank) if per_rank is not None else {
            n for n, o in self.objects.items() if _per_rank_by_default(o)}
        if ranked - set(self.objects) or RNG in self.objects:
            raise ValueError(f"per_rank names must be keys of state (and {RNG!r} is reserved)")
        self.per_rank = ranked
        self.directory = directory
        self.strategy = strategy or DDPStrategy()
        self.resume_mode, self.force_restart = resume, force_restart
        self.options = dict(storage_options or {})
        self.auto_save = save_every_steps == "auto"
        self.policy = _Policy(AUTO_FIRST if save_every_steps == "auto" else save_every_steps,
                              save_every_epochs, config)
        self.mtbf_seconds = mtbf_seconds  # as given (the estimate goes to the intervals)
        self.auto_interval = AutoInterval("checkpoint", AUTO_FIRST, mtbf_seconds)
        self.log_dir = None if log_dir is None else default_log_dir(directory, log_dir)
        self.tensorboard = tensorboard
        self.handle_signals = handle_signals and preemption is None
        self.samples_per_step = samples_per_step
        self.fingerprint = config_fingerprint
        self.log_progress = log_progress
        rank = dist.rank()
        store = CheckpointStore(open_storage(directory, self.options),
                                shard_bytes=max(1, int(shard_size_mb * 2**20)))
        self.records = RunRecords()
        check_config = check_config or (logged_differences(config) if config else None)
        self.checkpointer = Checkpointer(
            store, rank=rank, async_save=async_save, keep_last=keep_last, keep_best=keep_best,
            mode=mode, max_failed_saves=max_failed_saves, on_saved=self._on_saved,
            check_state=self._check, check_config=check_config,
            allow_config_change=allow_config_change, live=self._shared_state,
            lease=Lease(store.storage, run_identity(), lease_timeout)
            if lease_timeout and rank == self.strategy.writer_rank else None)
        self.memory = None if memory_every_steps is None else MemoryTier(
            memory_dir, store.storage.url, run_identity(), every_steps=memory_every_steps,
            mtbf_seconds=mtbf_seconds, check_state=self._check,
            check_config=None if allow_config_change else check_config,
            shard_bytes=store.shard_bytes)
        self.preemption = preemption or PreemptionHandler()
        self.agreement = dist.LaggedAgreement(3)  # [saves keep failing, preemption, lease lost]
        self.step = 0
        self.epoch = 0
        self._saved_step: int | None = None
        self._budget_checked = False
        self._hooks: list[Any] = []
        self._open = False
        self._started: float | None = None  # set by resume() until the first step_done()

    # ------------------------------------------------------------------ starting

    def resume(self) -> Resume:
        """Take the directory's lease, load the newest usable checkpoint into the registered
        objects (or start fresh), open the run records and start handling signals. Collective.

        Raises CheckpointError when checkpoints exist but none can be used (or another run
        holds the directory); with ``resume="never"``, when the directory holds checkpoints."""
        self._start_handling()
        cfg = self.checkpointer
        snapshot, found = self._memory_snapshots()
        plan, loaded = cfg.plan_start(self.resume_mode, self.force_restart, self.options,
                                      max((step for step, _ in found), default=-1))
        if dist.rank() == self.strategy.writer_rank:
            for skipped in plan.skipped:
                log.warning("skipping checkpoint %s", skipped)
            for note in plan.notes:
                log.warning("%s", note)
            if plan.changes:
                log.info("options changed since the checkpoint: %s", "; ".join(plan.changes))
        if plan.kind == "error":
            raise CheckpointError(plan.message) if plan.permanent else RuntimeError(plan.message)
        if plan.message and dist.rank() == 0:
            log.warning("%s", plan.message)
        source = f"{plan.root}/{plan.name}" if plan.name else None
        saved_at = None
        if plan.kind == "memory":
            source = self._resume_from_memory(snapshot, found, int(plan.name[5:]))
        elif plan.name:
            state, info = cfg.load(plan, loaded, self.options)
            self._load(state, source or "")
            self.step = info.step
            self.epoch = info.manifest.meta.epoch if info.manifest is not None else 0
            saved_at = info.manifest.created if info.manifest is not None else None
            self._saved_step = info.step if plan.root == cfg.store.storage.url else None
        if self.memory is not None:
            if plan.kind == "complete":
                self.memory.clear()
            else:
                self.memory.check_space(self._state_bytes())
        marker = self._open_records(plan, source) if plan.kind != "complete" else None
        self._estimate_mtbf()
        note = replay_note(plan, marker, self.step)
        if plan.name and self.log_progress and dist.rank() == self.strategy.writer_rank:
            log.info("resumed from %s: step %d%s", source, self.step, note)
        self._started = time.perf_counter()
        self.auto_interval.clock = (self._started, self.step)
        return Resume(self.step, self.epoch, plan.kind == "complete", source,
                      tuple(plan.skipped), saved_at, note, plan.message)

    def _estimate_mtbf(self) -> None:
        """With an ``auto`` interval: the expected time between failures from ``mtbf_seconds``
        and the failures in the run records (rank 0 reads them), the same on every rank.
        Collective when an interval is ``auto``."""
        if not (self.auto_save or self.memory is not None and self.memory.auto):
            return
        mtbf = estimate_mtbf(self.records.observed, self.mtbf_seconds)
        seconds, failures = self.records.observed
        if failures and dist.rank() == 0:
            log.info("auto intervals: expected time between failures %.0fs (%d failure(s) in "
                     "%.0fs of this run's records, with the given %.0fs counted as one more)",
                     mtbf, failures, seconds, self.mtbf_seconds)
        self.auto_interval.mtbf_seconds = float(dist.broadcast_object(mtbf))
        if self.memory is not None:
            self.memory.interval.mtbf_seconds = self.auto_interval.mtbf_seconds

    def _choose_save_interval(self, step: int, persisted: bool) -> None:
        """After a save with ``save_every_steps="auto"``: rank 0 re-chooses the interval
        (:class:`~distrib.checkpoint.interval.AutoInterval`) from its step time since the last
        save, the save's training-thread stall (the snapshot's when it was persisted from one)
        and the last write's duration, once a write has finished; every rank takes it.
        Collective."""
        step_seconds = self.auto_interval.tick(time.perf_counter(), step)
        cfg = self.checkpointer
        if dist.rank() == 0 and cfg.last_save_seconds > 0:
            stall = cfg.stall_seconds
            if persisted and self.memory is not None:
                stall += self.memory.checkpointer.stall_seconds
            self.auto_interval.update(stall, step_seconds, cfg.last_save_seconds)
        self.policy.save_every_steps = int(dist.broadcast_object(self.auto_interval.interval))

    @property
    def save_interval(self) -> int:
        """The step-save interval now (0: off; with ``auto``, the one chosen last). Local."""
        return self.policy.save_every_steps

    def _memory_snapshots(self) -> tuple[Snapshot | None, list[tuple[int, str]]]:
        """This node's newest usable memory snapshot, and every rank's (step or -1, host).
        Collective when the memory tier is on."""
        if self.memory is None:
            return None, []
        snapshot = None
        if self.force_restart or self.resume_mode == "never":
            self.memory.clear()
        else:
            snapshot = self.memory.newest()
        return snapshot, dist.all_gather_objects(
            (snapshot.step if snapshot else -1, self.memory.host))

    def _resume_from_memory(self, snapshot: Snapshot | None, found: list[tuple[int, str]],
                            step: int) -> str:
        """Every rank: load the memory tier's snapshot of ``step``, from this node's shared
        memory when every node has it, else broadcast from the first rank that has it (a
        replaced node has none). Returns its description. Collective."""
        assert self.memory is not None
        have = [s == step for s, _ in found]
        name = step_dir(step)
        if all(have):
            assert snapshot is not None
            state, epoch = snapshot.state, snapshot.epoch
            source = describe(self.memory.host, self.memory.path, name)
            how = "each node's own snapshot, no storage read"
        else:
            src = have.index(True)
            state, epoch = share(snapshot if dist.rank() == src else None, src)
            source = describe(found[src][1], self.memory.path, name)
            how = (f"broadcast from rank {src} on {found[src][1]} to the "
                   f"{have.count(False)} rank(s) without it, no storage read")
        self._load(state, source)
        self.step, self.epoch = step, epoch
        if dist.rank() == 0:
            log.info("resuming from the memory tier: step %d (%s)", step, how)
        return source

    def _state_bytes(self) -> int:
        """The size of one snapshot of the registered objects (every rank's per-rank state
        counted as this rank's)."""
        shared, mine = self._state()
        _, tensors = flatten_state({**shared, "per_rank": [mine] * dist.world_size()})
        return plan_layout(tensors).total

    def _start_handling(self) -> None:
        if self._open:
            return
        self._open = True
        if self.handle_signals:
            self.preemption.install()
        for obj in self.objects.values():  # async saves: wait for the copy before any update
            if isinstance(obj, torch.optim.Optimizer):
                self._hooks.append(obj.register_step_pre_hook(lambda *a, **k: self.fence()))

    def _open_records(self, plan: StartPlan, source: str | None) -> dict[str, Any] | None:
        """Open the run records; the ``resume`` marker of the interrupted launch, if any."""
        if self.log_dir is None:
            return None
        self.records = RunRecords.open(self.log_dir, parse_options(self.options),
                                       rank=dist.rank(), tensorboard=self.tensorboard,
                                       samples_per_step=self.samples_per_step)
        return self.records.start(step=self.step, epoch=max(1, self.epoch),
                           world_size=dist.world_size(), restart=self.force_restart,
                           resumed_from=source, heartbeat=plan.progress)

    # ------------------------------------------------------------------ state

    def _state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state shared by all ranks, this rank's own) of the registered objects."""
        shared = self._shared_state()
        mine = {n: self.objects[n].state_dict() for n in self.per_rank}
        mine[RNG] = capture_rng()
        return shared, mine

    def _shared_state(self) -> dict[str, Any]:
        """The state shared by all ranks of the registered objects (their live tensors)."""
        return {n: self._state_of(o) for n, o in self.objects.items() if n not in self.per_rank}

    def _state_of(self, obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            return self.strategy.model_state(obj)
        if isinstance(obj, torch.optim.Optimizer):
            return self.strategy.optimizer_state(obj)
        return obj.state_dict()

    def _check(self, state: Any) -> None:
        """Rank 0 at resume: InvalidCheckpoint unless ``state`` fits every registered object
        (nothing is changed)."""
        if not isinstance(state, dict):
            raise InvalidCheckpoint("state: not a mapping")
        missing = [n for n in self.objects if n not in self.per_rank and n not in state]
        if missing or not isinstance(state.get("per_rank"), list):
            raise InvalidCheckpoint(f"state: does not hold {', '.join(missing) or 'per_rank'}")
        for name, obj in self.objects.items():
            if name not in self.per_rank:
                self._check_object(name, obj, state[name])
        entries = state["per_rank"]
        for r, mine in enumerate(entries):
            if not isinstance(mine, dict):
                raise InvalidCheckpoint(f"per-rank state of rank {r}: not a mapping")
            check_rng(mine.get(RNG), f"per-rank state of rank {r}: rng")
        for name in self.per_rank:
            obj = self.objects[name]
            if hasattr(obj, "check_rank_states"):
                try:
                    obj.check_rank_states([mine.get(name) for mine in entries])
                except (ValueError, TypeError) as exc:
                    raise InvalidCheckpoint(f"{name}: {exc}") from None
                continue
            for mine in entries:
                if name in mine:
                    self._check_object(name, obj, mine[name])

    def _check_object(self, name: str, obj: Any, saved: Any) -> None:
        if isinstance(obj, torch.nn.Module):
            check_like(saved, self.strategy.model_state(obj), name)
        elif isinstance(obj, torch.optim.Optimizer):
            check_optimizer(saved, obj, name)
        elif hasattr(obj, "check_state_dict"):
            try:
                obj.check_state_dict(saved)
            except (ValueError, TypeError) as exc:
                raise InvalidCheckpoint(f"{name}: {exc}") from None
        elif isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler)):
            check_like(saved, obj.state_dict(), name, subset=True)
        elif not isinstance(saved, type(obj.state_dict())):
            raise InvalidCheckpoint(f"{name}: expected a {type(obj.state_dict()).__name__}")

    def _load(self, state: dict[str, Any], where: str) -> None:
        """Every rank: the checked state into the live objects."""
        try:
            for name, obj in self.objects.items():
                if name in self.per_rank:
                    continue
                if isinstance(obj, torch.nn.Module):
                    self.strategy.load_model_state(obj, state[name])
                elif isinstance(obj, torch.optim.Optimizer):
                    self.strategy.load_optimizer_state(obj, state[name])
                else:
                    obj.load_state_dict(state[name])
            self._load_per_rank(state["per_rank"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{where} could not be loaded ({type(exc).__name__}: "
                                  f"{str(exc)[:300]})") from None

    def _load_per_rank(self, per_rank: list[dict[str, Any]]) -> None:
        rank, world = dist.rank(), dist.world_size()
        if len(per_rank) != world:
            log.warning("resuming a %d-rank checkpoint with %d ranks: the number of samples "
                        "seen is preserved, but the run is no longer bit-identical to an "
                        "uninterrupted one", len(per_rank), world)
        mine = per_rank[rank] if rank < len(per_rank) else {}
        if RNG in mine:
            restore_rng(mine[RNG])
        for name in self.per_rank:
            obj = self.objects[name]
            if hasattr(obj, "load_rank_states"):  # it decides how to merge other world sizes
                obj.load_rank_states([entry.get(name) for entry in per_rank], rank, world)
            elif name in mine:
                obj.load_state_dict(mine[name])

    # ------------------------------------------------------------------ saving

    def save(self, step: int, *, metric: float | None = None, metric_name: str = "metric",
             blocking: bool = False, final: bool = False, replace: bool = False) -> None:
        """Checkpoint the registered objects as step ``step`` (asynchronously unless
        ``blocking``). Collective."""
        shared, mine = self._state()
        meta = self._meta(final, metric, metric_name)
        blocking = blocking or final
        self.checkpointer.save(step, shared, mine, meta, blocking=blocking, replace=replace,
                               skip_if_committed=blocking and not replace,
                               deferrable=self._deferrable())
        self._saved_step = step
        if blocking:
            dist.barrier()  # nobody goes on while the writer is still committing

    def _meta(self, final: bool = False, metric: float | None = None,
              metric_name: str = "metric") -> Meta:
        return Meta(epoch=self.epoch, world_size=dist.world_size(), final=final,
                    metric=None if metric is None else Metric(
                        metric_name, metric if math.isfinite(metric) else None,
                        self.checkpointer.mode),  # type: ignore[arg-type]
                    config=dict(self.policy.config) if self.policy.config is not None else None,
                    config_fingerprint=self.fingerprint, torch=torch.__version__)

    def snapshot(self, step: int) -> None:
        """A memory-tier snapshot of the registered objects as step ``step`` (asynchronously).
        Collective; a no-op without the memory tier."""
        if self.memory is not None:
            shared, mine = self._state()
            self.memory.save(step, shared, mine, self._meta(), self._deferrable(),
                             time.perf_counter())

    def _deferrable(self) -> list[torch.Tensor]:
        """Tensors only ``optimizer.step()`` changes: the registered optimizers' parameters and
        state (the step pre-hook waits for their background copy)."""
        out: list[torch.Tensor] = []
        for obj in self.objects.values():
            if isinstance(obj, torch.optim.Optimizer):
                out += [p for g in obj.param_groups for p in g["params"]]
                out += [v for st in obj.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor)]
        return out

    def fence(self) -> None:
        """Wait until the background copy of the last save no longer needs the parameters.
        Local; the registered optimizers call it before every step."""
        self.checkpointer.fence()
        if self.memory is not None:
            self.memory.checkpointer.fence()

    def step_done(self, step: int, *, epoch: int | None = None, epoch_ends: bool = False,
                  ending: bool = False) -> None:
        """Call at every optimizer-step boundary: save when ``save_every_steps`` says so, and
        act on what the ranks agreed (preemption: the emergency checkpoint, then Preempted;
        saves that keep failing: SaveFailedError; the lease lost: CheckpointError).
        ``epoch_ends``: this step ends an epoch whose :meth:`epoch_done` will save (the step
        save is left to it); ``ending``: :meth:`finish` follows (it saves this step).
        Collective, but never waits for the other ranks unless one of those happens."""
        self.step = step
        if epoch is not None:
            self.epoch = epoch
        if self._started is not None:
            if self.log_progress and dist.rank() == self.strategy.writer_rank:
                log.info("first optimizer step done %.2fs after resume() began",
                         time.perf_counter() - self._started)
            self._started = None
        self.checkpointer.note_progress(step, self.epoch)
        self._check_shutdown_budget()
        self.agree()
        every = self.policy.save_every_steps
        if epoch_ends and self.epoch_save_due(self.epoch) or ending:
            return
        durable = bool(every) and step % every == 0 and self._saved_step != step
        persisted = False
        if self.memory is not None and (self.memory.due(step, time.perf_counter()) or durable):
            self.snapshot(step)
            # the durable checkpoint is written from the snapshot: one copy of the state
            persisted = durable and self.memory.persistable and self.strategy.writer_rank == 0
        if persisted:
            assert self.memory is not None
            self.checkpointer.save_from(step, self.memory.persisted(step))
            self._saved_step = step
        elif durable:
            self.save(step)
        if durable and self.auto_save:
            self._choose_save_interval(step, persisted)

    def epoch_save_due(self, epoch: int) -> bool:
        """Whether :meth:`epoch_done` of ``epoch`` saves (``save_every_epochs``). Local."""
        every = self.policy.save_every_epochs
        return bool(every) and epoch % every == 0

    def epoch_done(self, epoch: int, *, metric: float | None = None,
                   metric_name: str = "metric", ending: bool = False) -> None:
        """Call after each epoch (``epoch`` epochs are complete): saves when
        ``save_every_epochs`` says so (``metric`` is kept for ``keep_best``), unless ``ending``
        (:meth:`finish` follows), and always agrees on the flags. Collective."""
        self.epoch = epoch
        self.agree(due=True)
        every = self.policy.save_every_epochs
        if every and epoch % every == 0 and self._saved_step != self.step and not ending:
            if self.memory is not None:  # the memory tier is never older than the durable one
                self.snapshot(self.step)
            self.save(self.step, metric=metric, metric_name=metric_name)

    def agree(self, due: bool = False) -> None:
        """Exchange this rank's flags and act on the ones every rank agreed on (see
        :meth:`step_done`). Collective."""
        fatal, preempt, lost = self.agreement.exchange(
            [self.checkpointer.poll(), self.preemption.requested, self.checkpointer.lease_lost],
            due=due)
        if lost:
            raise CheckpointError(f"another run took over {self.directory} (its lease went "
                                  "stale: was this job paused?); stopping without writing there "
                                  "again")
        if fatal:
            raise SaveFailedError(f"{self.checkpointer.max_failed_saves} consecutive checkpoint "
                                  "saves failed; stopping (the newest committed checkpoint is "
                                  "intact)")
        if preempt:
            self._emergency_save()

    def request_stop(self) -> None:
        """Note a preemption notice on this rank (what the signal handler does); the ranks act
        on it at a later :meth:`step_done`. Local, and safe to call from a signal handler."""
        self.preemption.requested = True

    def _emergency_save(self) -> None:
        name = self.preemption.signal_name
        if dist.rank() == 0:
            log.warning("preemption notice (%s): writing an emergency checkpoint at step %d",
                        name or "received by another rank", self.step)
        started = time.perf_counter()
        self.save(self.step, blocking=True)
        if dist.any_rank(not self.checkpointer.committed(self.step)):
            raise SaveFailedError("the emergency checkpoint could not be written")
        self.checkpointer.note_progress(self.step, self.epoch, reason="preempted")
        if self.memory is not None:  # the durable tier holds this very step
            self.memory.clear()
        self.records.end("preempted", step=self.step, epoch=self.epoch, reason=name)
        if dist.rank() == 0:
            log.warning("emergency checkpoint committed in %.1fs; exiting with code 75 "
                        "(preempted)", time.perf_counter() - started)
        raise Preempted(self.step, name)

    def _check_shutdown_budget(self) -> None:
        """After the first save, warn once (writer) if an emergency save would not fit
        torchrun's shutdown timeout."""
        seconds = self.checkpointer.last_save_seconds
        if self._budget_checked or not seconds or dist.rank() != self.strategy.writer_rank:
            return
        self._budget_checked = True
        for problem in shutdown_budget_problems(seconds + self.checkpointer.stall_seconds):
            log.warning("%s", problem)

    # ------------------------------------------------------------------ finishing

    def finish(self, step: int, *, metric: float | None = None, metric_name: str = "metric",
               replace: bool = False, info: Mapping[str, Any] | None = None) -> None:
        """The final checkpoint (kept if this very step is already committed, unless
        ``replace``), then the COMPLETE marker: a relaunch finds the run complete. Collective."""
        self.step = step
        self.save(step, metric=metric, metric_name=metric_name, final=True, replace=replace)
        self.agreement.drain()
        if dist.any_rank(not self.checkpointer.committed(step)):
            raise SaveFailedError("the final checkpoint could not be written")
        if dist.rank() == 0:
            self.checkpointer.store.mark_complete({
                "step": step, "epoch": self.epoch, **dict(info or {}),
                **({"config": dict(self.policy.config)} if self.policy.config else {})})
            self.checkpointer.note_progress(step, self.epoch, reason="finished")
        if self.memory is not None:
            self.memory.clear()

    def log(self, step: int, **values: float) -> None:
        """Add a record of ``values`` at ``step`` to the run records (rank 0; local)."""
        self.records.metrics(step, self.epoch, values)

    def close(self, status: str | None = "finished", message: str = "") -> None:
        """Release the lease and the signal handlers, close the records with an ``end`` record
        of ``status`` (None: the caller wrote its own). Local; call on every rank when the loop
        ends (a ``with`` block does it)."""
        if not self._open:
            return
        self._open = False
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.handle_signals:
            self.preemption.uninstall()
        if status is not None:
            self.records.end(status, step=self.step, epoch=self.epoch, message=message)
        if self.memory is not None:
            self.memory.close()
        self.checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        status = "finished" if kind is None else ("preempted" if kind is Preempted
                                                  else "failed")
        self.close(status, "" if exc is None else f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ records

    def _on_saved(self, step: int, seconds: float, nbytes: int,
                  error: BaseException | None) -> None:
        self.records.checkpoint(step, seconds, nbytes, error)


def logged_differences(current: Mapping[str, Any]) -> ConfigCheck:
    """A ``check_config`` that refuses nothing and logs every setting that differs from the
    checkpoint's (the default when a loop gives ``config``)."""
    def check(saved: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in current.items()
                   if key in saved and saved[key] != value]
        return [], changed
    return check
