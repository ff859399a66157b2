"""The training loop: resume -> steps -> evaluate -> decide -> save, the same on every rank.

Every rank executes the same sequence of collectives: DDP's gradient all-reduce on the last
micro-step of each optimizer step, the (sum, count) reductions at the end of an epoch, the
broadcast of rank 0's early-stopping decision, and the checkpoint gathers. Decisions that end the
loop (max steps, early stop, a fatal checkpoint failure) are either computed from globally reduced
values or broadcast, so no rank is ever left waiting in a collective another rank has left.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset

from distrib import dist
from distrib.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore, SaveFailedError
from distrib.checkpointer import Checkpointer, StartPlan, replay_note
from distrib.config import Config, ConfigError, resume_differences
from distrib.data import StreamShard, TrainStream, check_data, is_stream, stateful_loader
from distrib.early_stopping import EarlyStopping
from distrib.format import InvalidCheckpoint, Meta, Metric
from distrib.lease import Lease, run_identity
from distrib.logs import Progress, progress_enabled, setup_logging
from distrib import exitcodes
from distrib.optim import build_optimizer, build_scheduler, current_lr
from distrib.preemption import (Preempted, PreemptionHandler, detach_worker_process,
                                shutdown_budget_problems, torchrun_env_problem, worker_context)
from distrib.records import RunRecords, default_log_dir
from distrib.preflight import check_locations
from distrib.sampler import ResumableSampler
from distrib.state import capture_rng, derive_seed, restore_rng, seed_everything, seed_worker
from distrib.statecheck import check_like, check_number, check_optimizer, check_rng
from distrib.storage import open_storage, parse_options
from distrib.tasks import Task, TaskBuilder, build_task

log = logging.getLogger(__name__)

#: the top-level keys of a Trainer checkpoint's state
_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "early_stopping", "best_model",
               "progress", "history", "per_rank")


class Callback:
    """Hooks into the loop. Every rank calls every hook; keep collectives symmetric."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "FitResult") -> None: ...


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns (identical on every rank)."""

    stop_reason: str  # max_epochs | max_steps | early_stop | already_complete
    epochs: int  # epochs completed
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    message: str = ""
    best_epoch: int | None = None
    best_value: float | None = None
    model: torch.nn.Module | None = None


def _worker_init(worker_id: int) -> None:
    """Every data-loader worker: seeded from its loader, outside the launcher's signals."""
    seed_worker(worker_id)
    detach_worker_process()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _batch_len(target: Any) -> int:
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.dim() else 1
    return len(target)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class Trainer:
    """Train a :class:`~distrib.tasks.Task` with DDP, early stopping and checkpoints.

    Args:
        config: the run configuration.
        task: the task, or the function that builds it from the config (called as the command
            line calls ``--task``: after seeding torch with ``--seed``, so the model's initial
            weights are the same in every run); built from ``config.train.task`` when omitted.
        callbacks: loop hooks (see :class:`Callback`).

    :meth:`fit` must be called on every rank. It creates the process group from the torchrun
    environment if none exists (and destroys it again on return, also on error).
    """

    model: torch.nn.Module  # what trains: the module, DDP-wrapped when there are ranks

    def __init__(self, config: Config, task: Task | TaskBuilder | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.task: Task | None = task if isinstance(task, Task) else None
        self._builder = None if isinstance(task, Task) else task
        self.callbacks = list(callbacks)
        self.epoch = 0
        self.global_step = 0
        self.samples_done = 0  # samples of the current epoch consumed, over all ranks
        self.history: list[dict[str, float]] = []
        self.stop_reason: str | None = None
        self.stop_message = ""
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_metric: float | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        self._grad_norm: torch.Tensor | None = None
        self.records = RunRecords()  # disabled until _fit opens them (rank 0)

    # ================================================================== set-up

    def fit(self) -> FitResult:
        """Run (or resume) training to the end; see the class docstring.

        Before the process group exists, the checkpoint and log locations are checked and the
        task is built (and the monitored metric checked against it): a problem is a
        :class:`~distrib.ConfigError` on every rank, and nothing has been written.
        """
        check_locations(self.config)
        if self.task is None:
            self.task = build_task(self.config, self._builder)
        self.check_monitor(self.config, self.task)
        check_data(self.config, self.task)
        info, owns_group = dist.setup(self.config.train.dist_timeout)
        self.info = info
        self._fit_started = time.perf_counter()
        self._first_step_at: float | None = None
        self._budget_checked = False
        setup_logging(info.rank, self.config.log.log_level)
        self.preemption = PreemptionHandler().install()
        graceful = False
        try:
            result = self._fit()
            dist.barrier()  # nobody leaves while a peer may still be talking to it
            graceful = True
            return result
        except Preempted:
            graceful = True  # every rank raises it together, after a barrier
            raise
        except Exception as exc:  # local bookkeeping only, no collective
            self.records.end("failed", step=self.global_step, epoch=self._epoch_label(),
                             message=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.preemption.uninstall()
            checkpointer = getattr(self, "checkpointer", None)
            if checkpointer is not None:
                checkpointer.close()  # rank 0: the writers are done, the lease is released
            if owns_group:
                # DDP's reducer holds the group: drop the wrapper first, or the group (its gloo
                # threads, its store) would outlive teardown until the trainer is collected
                if hasattr(self, "module"):
                    self.model = self.module
                dist.teardown(graceful=graceful)

    def _fit(self) -> FitResult:
        cfg = self.config
        assert self.task is not None
        seed_everything(derive_seed(cfg.train.seed, "rank", self.info.rank))
        self._build_model(self.task)
        self._build_optim(self.task)
        self.records = self._open_records()
        self.checkpointer = self._build_checkpointer()
        # [a fatal save failure, a preemption notice, the directory's lease lost]
        self.agreement = dist.LaggedAgreement(3)
        problems = [*shutdown_budget_problems(None), torchrun_env_problem()]
        for problem in filter(None, problems) if dist.rank() == 0 else ():
            log.warning("%s", problem)
        started = self._start()
        if started is not None:
            return started
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.stop_reason is None:
            self._run_epoch()
        return self._finish()

    @staticmethod
    def check_monitor(config: Config, task: Task) -> list[str]:
        """The metric names ``task`` reports; ConfigError if ``--monitor-metric`` is not one of
        them."""
        names = ["train_loss"]
        if task.val_dataset is not None:
            names += ["val_loss"] + [f"val_{name}" for name in task.metrics]
        if config.early_stop.monitor not in names:
            raise ConfigError(f"--monitor-metric: {config.early_stop.monitor!r} is not reported by "
                              f"this task (choose from {', '.join(names)})")
        return names

    def _build_model(self, task: Task) -> None:
        self.device = self.info.device
        self.module = task.model.to(self.device)
        self.raw_module = unwrap(self.module)  # state dicts without torch.compile's prefixes
        self.model = self.module
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.module, device_ids=ids)
        ds = self.config.train
        self.stream: TrainStream | None = None
        if is_stream(task.train_dataset):
            self.stream = TrainStream(task.train_dataset, rank=dist.rank(),  # type: ignore[arg-type]
                                      world=dist.world_size(), workers=ds.num_workers,
                                      batch_size=ds.batch_size, accum=ds.grad_accum_steps)
            self.steps_per_epoch = self.stream.steps_per_epoch  # 0: unknown (no __len__)
            return
        self.train_sampler = ResumableSampler(len(task.train_dataset),  # type: ignore[arg-type]
                                              num_replicas=dist.world_size(),
                                              rank=dist.rank(), shuffle=True, seed=ds.seed)
        batches = math.ceil(len(self.train_sampler) / ds.batch_size)
        self.steps_per_epoch = max(1, math.ceil(batches / ds.grad_accum_steps))

    def _build_optim(self, task: Task) -> None:
        cfg = self.config
        factory = task.optimizer_factory or build_optimizer
        self.optimizer = factory(self.module.parameters(), cfg)
        total = cfg.train.max_steps or self.steps_per_epoch * cfg.train.max_epochs
        if task.scheduler_factory is not None:
            self.scheduler: Any = task.scheduler_factory(self.optimizer, cfg, total)
        else:
            self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, total)
        fp16 = cfg.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        es = cfg.early_stop
        self.early_stopping = EarlyStopping(
            monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta,
            stopping_threshold=es.stopping_threshold, divergence_threshold=es.divergence_threshold,
            check_finite=es.check_finite, baseline=es.baseline,
            start_from_epoch=es.start_from_epoch, restore_best_weights=es.restore_best)

    def _build_checkpointer(self) -> Checkpointer:
        c = self.config.ckpt
        store = CheckpointStore(open_storage(c.checkpoint_dir, self.storage_options),
                                shard_bytes=int(c.shard_size_mb * 2**20))
        lease = None
        if c.lease_timeout and dist.rank() == 0:
            lease = Lease(store.storage, run_identity(), c.lease_timeout)
        return Checkpointer(store, rank=dist.rank(), async_save=c.async_save,
                            keep_last=c.keep_last, keep_best=c.keep_best,
                            mode=self.config.early_stop.mode, max_failed_saves=c.max_failed_saves,
                            on_saved=self.records.checkpoint, check_state=self._check_state,
                            check_config=lambda saved: resume_differences(saved, self.config),
                            allow_config_change=c.allow_config_change, lease=lease)

    def _open_records(self) -> RunRecords:
        cfg = self.config
        return RunRecords.open(default_log_dir(cfg.ckpt.checkpoint_dir, cfg.log.log_dir),
                               self.storage_options, rank=dist.rank(),
                               tensorboard=cfg.log.tensorboard,
                               samples_per_step=cfg.train.batch_size * dist.world_size()
                               * cfg.train.grad_accum_steps)

    @property
    def storage_options(self) -> dict[str, Any]:
        return parse_options(self.config.ckpt.storage_options)

    # ================================================================== resume

    def _start(self) -> FitResult | None:
        """Resume, start fresh, or report an already complete run. Collective."""
        c = self.config.ckpt
        plan, loaded = self.checkpointer.plan_start(c.resume, c.force_restart,
                                                    self.storage_options)
        if dist.rank() == 0:
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
        where = f"{plan.root}/{plan.name}"
        info = None
        if plan.name:
            state, info = self.checkpointer.load(plan, loaded, self.storage_options)
            self._restore(state, info, where, plan)
        if plan.kind == "complete":
            if info is not None:
                self._log_resume(where, info, plan, None)
            log.info("nothing to do (use --force-restart to train again)")
            return FitResult("already_complete", self.epoch, self.global_step, self.history,
                             plan.message, *self._best(), self.module if plan.name else None)
        marker = self.records.start(step=self.global_step, epoch=self.epoch + 1,
                                    world_size=dist.world_size(), restart=c.force_restart,
                                    resumed_from=where if plan.name else None,
                                    heartbeat=plan.progress)
        if info is not None:
            self._log_resume(where, info, plan, marker)
        return None

    def _epoch_label(self) -> int:
        """The epoch a step belongs to, counted from 1 as the logs count: the epoch in progress,
        or at an epoch boundary the one just completed. Manifests, records, ``progress.json``
        and COMPLETE use it; ``self.epoch`` is the 0-based index of the epoch in progress."""
        return max(1, self.epoch + 1 if self.samples_done else self.epoch)

    def _best(self) -> tuple[int | None, float | None]:
        """(best epoch, counted from 1, and its value) as early stopping knows them."""
        es = self.early_stopping
        return (None, None) if es.best_epoch is None else (es.best_epoch + 1, es.best)

    def _check_state(self, state: Any) -> None:
        """Rank 0, at start-up: InvalidCheckpoint unless ``state`` (a loaded checkpoint) fits
        this run's model, optimizer, scheduler, scaler and early stopping, and its own parts
        are well formed. Nothing is changed."""
        if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
            raise InvalidCheckpoint("state: not a distrib.Trainer checkpoint (missing "
                                    f"{', '.join(k for k in _STATE_KEYS if k not in state)})"
                                    if isinstance(state, dict) else "state: not a mapping")
        model = self.raw_module.state_dict()
        check_like(state["model"], model, "model")
        if state["best_model"] is not None:
            check_like(state["best_model"], model, "best model")
        check_optimizer(state["optimizer"], self.optimizer)
        for key, live in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if live is not None and state[key] is not None:
                check_like(state[key], live.state_dict(), key, subset=True)
        try:
            self.early_stopping.check_state_dict(state["early_stopping"])
        except ValueError as exc:
            raise InvalidCheckpoint(str(exc)) from None
        p = state["progress"]
        if not isinstance(p, dict):
            raise InvalidCheckpoint("progress: not a mapping")
        for key in ("epoch", "global_step", "samples_done"):
            check_number(p.get(key), f"progress.{key}", integer=True)
        check_number(p.get("world_size"), "progress.world_size", integer=True, lo=1)
        check_number(p.get("last_metric"), "progress.last_metric", lo=-math.inf, optional=True)
        history = state["history"]
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and all(isinstance(k, str) and (v is None or isinstance(
                    v, (int, float))) for k, v in h.items()) for h in history):
            raise InvalidCheckpoint("history: not a list of metric mappings")
        per_rank = state["per_rank"]
        if not isinstance(per_rank, list) or len(per_rank) != p["world_size"]:
            raise InvalidCheckpoint(f"per-rank state: expected {p['world_size']} entries")
        for r, mine in enumerate(per_rank):
            if not isinstance(mine, dict) or not isinstance(mine.get("train_loss"), list) \
                    or len(mine["train_loss"]) != 2:
                raise InvalidCheckpoint(f"per-rank state of rank {r}: malformed")
            check_rng(mine.get("rng"), f"per-rank state of rank {r}: rng")
            check_number(mine["train_loss"][0], f"rank {r} train loss", lo=-math.inf)
            check_number(mine["train_loss"][1], f"rank {r} sample count", integer=True)
        if self.stream is not None:
            self.stream.check([mine.get("data") for mine in per_rank], int(p["epoch"]))

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state shared by all ranks, this rank's own state) for a checkpoint."""
        shared = {
            "model": self.raw_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "early_stopping": self.early_stopping.state_dict(),
            "best_model": self.best_state,
            "progress": {"epoch": self.epoch, "global_step": self.global_step,
                         "samples_done": self.samples_done, "world_size": dist.world_size(),
                         "last_metric": self.last_metric},
            "history": self.history,
        }
        per_rank = {"rng": capture_rng(),
                    "train_loss": [float(self._loss_sum), self._loss_count]}
        if self.stream is not None:  # its data position: after the batches consumed so far
            return shared, {**per_rank, "data": self.stream.state()}
        return shared, per_rank

    def _restore(self, state: dict[str, Any], info: CheckpointInfo, where: str,
                 plan: StartPlan) -> None:
        """Load a checkpoint's state into the live objects (every rank). It was checked by
        :meth:`_check_state` on rank 0; a failure here anyway is a CheckpointError."""
        try:
            self._load_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{where} could not be loaded ({type(exc).__name__}: "
                                  f"{str(exc)[:300]})") from None
        self._check_limits()

    def _log_resume(self, where: str, info: CheckpointInfo, plan: StartPlan,
                    marker: dict[str, Any] | None) -> None:
        """Rank 0: what was resumed, and how many steps are replayed: the same figure as the
        run records' ``resume`` marker (the interrupted launch's last record or the checkpoint
        heartbeat, whichever got further)."""
        assert info.manifest is not None
        age = time.time() - info.manifest.created
        lost = replay_note(plan, marker, self.global_step)
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch, saved %.0fs "
                 "ago%s", where, self.epoch + 1, self.global_step, self.samples_done, age, lost)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.raw_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.best_state = state["best_model"]
        p = state["progress"]
        self.epoch, self.global_step = int(p["epoch"]), int(p["global_step"])
        self.samples_done, self.last_metric = int(p["samples_done"]), p["last_metric"]
        self.history = list(state["history"])
        self._restore_per_rank(state["per_rank"], int(p["world_size"]))
        if self.stream is not None:
            self.stream.load([mine.get("data") for mine in state["per_rank"]],
                             int(p["world_size"]), self.epoch)

    def _check_limits(self) -> None:
        """Set the stop reason if the restored state has already reached the end of training."""
        t = self.config.train
        if self.early_stopping.stopped and self.config.early_stop.early_stop:
            self.stop_reason, self.stop_message = "early_stop", self.early_stopping.reason or ""
        elif t.max_steps and self.global_step >= t.max_steps:
            self.stop_reason, self.stop_message = "max_steps", f"reached --max-steps {t.max_steps}"
        elif self.epoch >= t.max_epochs:
            self.stop_reason = "max_epochs"
            self.stop_message = f"reached --max-epochs {t.max_epochs}"

    def _restore_per_rank(self, per_rank: list[dict[str, Any]], saved_world: int) -> None:
        rank, world = dist.rank(), dist.world_size()
        if saved_world == world:
            mine = per_rank[rank]
            restore_rng(mine["rng"])
            self._loss_sum = torch.tensor(mine["train_loss"][0], dtype=torch.float64)
            self._loss_count = int(mine["train_loss"][1])
            return
        log.warning("resuming a %d-rank checkpoint with %d ranks: the number of samples seen is "
                    "preserved, but the run is no longer bit-identical to an uninterrupted one",
                    saved_world, world)
        if rank < saved_world:
            restore_rng(per_rank[rank]["rng"])
        if rank == 0:  # keep the epoch's global train-loss sum exact
            self._loss_sum = torch.tensor(sum(r["train_loss"][0] for r in per_rank),
                                          dtype=torch.float64)
            self._loss_count = sum(int(r["train_loss"][1]) for r in per_rank)

    # ================================================================== the loop

    def _loader(self, dataset: Dataset[Any], sampler: ResumableSampler | None, purpose: str
                ) -> DataLoader[Any]:
        """A loader whose worker seeds derive from (seed, purpose, epoch, rank) and which never
        draws from the global RNG (so dropout streams are the same with or without resume).
        Without a sampler, ``dataset`` is a :class:`~distrib.data.StreamShard`; training reads
        it through a StatefulDataLoader (its state is the data position)."""
        t = self.config.train
        gen = torch.Generator().manual_seed(derive_seed(t.seed, purpose, self.epoch, dist.rank()))
        make = stateful_loader if sampler is None and purpose == "train" else DataLoader
        return make(dataset, batch_size=t.batch_size, sampler=sampler,
                    num_workers=t.num_workers, collate_fn=self.task.collate_fn,  # type: ignore[union-attr]
                    pin_memory=self.device.type == "cuda", generator=gen,
                    worker_init_fn=_worker_init if t.num_workers else None,
                    multiprocessing_context=worker_context() if t.num_workers else None)

    def _forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        """The task's ``forward(model, inputs)`` if it has one; else a mapping of inputs goes in
        as keyword arguments (``model(**inputs)``, as Hugging Face models take them) and
        anything else as one argument."""
        task = self.task
        assert task is not None
        if task.forward is not None:
            return task.forward(model, inputs)
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.config.train.precision
        if precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _run_epoch(self) -> None:
        cfg, task = self.config, self.task
        assert task is not None
        if self.stream is not None:
            self._run_stream_epoch(self.stream)
            return
        self.train_sampler.set_epoch(self.epoch, start=self.samples_done)
        loader = self._loader(task.train_dataset, self.train_sampler, "train")
        n, accum = len(loader), cfg.train.grad_accum_steps
        progress = Progress(progress_enabled(cfg.log.progress, dist.rank()))
        self.model.train()
        started, samples = time.perf_counter(), 0
        for i, (inputs, target) in enumerate(progress.wrap(loader, n, f"epoch {self.epoch + 1}")):
            group_start = i - i % accum
            group_size = min(accum, n - group_start)
            last_micro = i == group_start + group_size - 1
            samples += self._micro_step(inputs, target, sync=last_micro, scale=1.0 / group_size)
            self.samples_done += cfg.train.batch_size * dist.world_size()
            if last_micro:
                self._optimizer_step()
                if progress.enabled:
                    progress.set_postfix(loss=f"{self._running_loss():.4f}")
                if self._step_boundary(last_of_epoch=i == n - 1):
                    return
        self._end_epoch(time.perf_counter() - started, samples * dist.world_size())

    def _run_stream_epoch(self, stream: TrainStream) -> None:
        """An epoch of a stream: optimizer steps while every rank has a full group of
        micro-batches (see :mod:`distrib.data`)."""
        cfg = self.config
        progress = Progress(progress_enabled(cfg.log.progress, dist.rank()))
        self.model.train()
        started, samples = time.perf_counter(), 0
        stream.start_epoch(self.epoch, lambda reader: self._loader(reader, None, "train"))
        groups = iter(stream.next_group, None)
        try:
            for group in progress.wrap(groups, stream.steps_per_epoch or None, f"epoch {self.epoch}"):
                for j, (inputs, target) in enumerate(group.batches):
                    self._micro_step(inputs, target, sync=j == len(group.batches) - 1,
                                     scale=1.0 / len(group.batches))
                samples += group.samples
                self.samples_done += group.samples
                self._optimizer_step()
                if progress.enabled:
                    progress.set_postfix(loss=f"{self._running_loss():.4f}")
                # whether this step ends the epoch matters only when a step save is due that the
                # epoch's own save would repeat; only then look ahead (a collective)
                every = cfg.ckpt.save_every_steps
                last = bool(every) and self.global_step % every == 0 and self._epoch_save_due() \
                    and stream.is_last()
                if self._step_boundary(last_of_epoch=last):
                    return
        finally:
            stream.stop()  # left early: the position is kept for the final save
        self._end_epoch(time.perf_counter() - started, samples)

    def _micro_step(self, inputs: Any, target: Any, *, sync: bool, scale: float) -> int:
        inputs, target = _to(inputs, self.device), _to(target, self.device)
        no_sync = isinstance(self.model, DDP) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with self._autocast():
                loss = self.task.loss_fn(self._forward(self.model, inputs), target)  # type: ignore[union-attr]
            scaled = loss * scale
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        count = _batch_len(target)
        # kept on the loss's device: reading it (logging, epoch end) is the only host sync
        self._loss_sum = self._loss_sum.to(loss.device) + loss.detach().double() * count
        self._loss_count += count
        return count

    def _optimizer_step(self) -> None:
        t = self.config.train
        self.checkpointer.fence()  # a background snapshot may still be reading the weights
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.scaler is not None and (t.clip_grad_norm or t.clip_grad_value):
            self.scaler.unscale_(self.optimizer)
        if t.clip_grad_norm:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm)
        elif self.records.enabled and self._logged(self.global_step + 1):
            self._grad_norm = self._total_grad_norm(params, unscaled=bool(t.clip_grad_value))
        if t.clip_grad_value:
            torch.nn.utils.clip_grad_value_(params, t.clip_grad_value)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step()
        self.global_step += 1

    def _logged(self, step: int) -> bool:
        every = self.config.log.log_every_steps
        return bool(every) and step % every == 0

    def _total_grad_norm(self, params: list[torch.nn.Parameter], unscaled: bool) -> torch.Tensor:
        """The global gradient norm (gradients are already all-reduced), for the records."""
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params]  # type: ignore[union-attr]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return norm / self.scaler.get_scale() if self.scaler is not None and not unscaled else norm

    def _running_loss(self) -> float:
        return float(self._loss_sum) / max(1, self._loss_count)

    def _step_boundary(self, last_of_epoch: bool) -> bool:
        """After an optimizer step: hooks, logging, periodic saves. True ends the epoch early."""
        cfg = self.config
        for cb in self.callbacks:
            cb.on_step_end(self)
        if self._logged(self.global_step):
            log.info("step %d | epoch %d | loss %.4f | lr %.3g", self.global_step, self.epoch + 1,
                     self._running_loss(), current_lr(self.optimizer))
            norm, self._grad_norm = self._grad_norm, None
            self.records.step(self.global_step, self.epoch, self._running_loss(),
                              current_lr(self.optimizer), None if norm is None else float(norm))
        if self._first_step_at is None:
            self._first_step_at = time.perf_counter() - self._fit_started
            log.info("first optimizer step done %.2fs after start-up began", self._first_step_at)
        self.checkpointer.note_progress(self.global_step, self._epoch_label())
        self._check_shutdown_budget()
        self._agree()
        if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
            self.stop_reason = "max_steps"
            self.stop_message = f"reached --max-steps {cfg.train.max_steps}"
            return True
        every = cfg.ckpt.save_every_steps
        if every and self.global_step % every == 0 and not (last_of_epoch and self._epoch_save_due()):
            self._save()
        return False

    def _check_shutdown_budget(self) -> None:
        """After the first save, warn once if an emergency save would not fit torchrun's
        shutdown timeout (rank 0, which is the one that writes)."""
        seconds = self.checkpointer.last_save_seconds
        if self._budget_checked or dist.rank() != 0 or not seconds:
            return
        self._budget_checked = True
        for problem in shutdown_budget_problems(seconds + self.checkpointer.stall_seconds):
            log.warning("%s", problem)

    def _agree(self, due: bool = False) -> None:
        """Note this step's local flags and act on the ones every rank has agreed on (about a
        quarter of a second later, see :class:`distrib.dist.LaggedAgreement`). Collective, but
        never blocks on the step."""
        fatal, preempt, lost = self.agreement.exchange(
            [self.checkpointer.poll(), self.preemption.requested, self.checkpointer.lease_lost],
            due=due)
        if lost:
            raise CheckpointError(f"another run took over {self.config.ckpt.checkpoint_dir} "
                                  "(its lease went stale: was this job paused?); stopping "
                                  "without writing there again")
        if fatal:
            raise SaveFailedError(f"{self.config.ckpt.max_failed_saves} consecutive checkpoint "
                                  "saves failed; stopping (the newest committed checkpoint is "
                                  "intact)")
        if preempt:
            self._emergency_save()

    def _emergency_save(self) -> None:
        """Every rank: wait for the save in flight, commit this step, then leave together."""
        name = self.preemption.signal_name
        if dist.rank() == 0:
            log.warning("preemption notice (%s): writing an emergency checkpoint at step %d",
                        name or "received by another rank", self.global_step)
        started = time.perf_counter()
        self._save(metric=None, blocking=True)
        if dist.any_rank(not self.checkpointer.committed(self.global_step)):
            raise SaveFailedError("the emergency checkpoint could not be written")
        self.checkpointer.note_progress(self.global_step, self._epoch_label(), reason="preempted")
        self.records.end("preempted", step=self.global_step, epoch=self._epoch_label(),
                         reason=name)
        if dist.rank() == 0:
            log.warning("emergency checkpoint committed in %.1fs; exiting with code %d "
                        "(preempted)", time.perf_counter() - started, exitcodes.PREEMPTED)
        raise Preempted(self.global_step, name)

    def _epoch_save_due(self) -> bool:
        every = self.config.ckpt.save_every_epochs
        return bool(every) and (self.epoch + 1) % every == 0

    # ================================================================== epoch end

    def _end_epoch(self, seconds: float, samples: int) -> None:
        """Reduce, evaluate, decide, log and save. Collective."""
        cfg = self.config
        loss_sum, count = dist.all_reduce_sum([float(self._loss_sum), float(self._loss_count)])
        metrics = {"epoch": float(self.epoch + 1), "step": float(self.global_step),
                   "train_loss": loss_sum / count if count else math.nan}
        last = self.epoch + 1 >= cfg.train.max_epochs
        if self.task.val_dataset is not None and (  # type: ignore[union-attr]
                last or (self.epoch + 1) % cfg.train.eval_every_epochs == 0):
            metrics.update(self.evaluate())
        metrics["lr"] = current_lr(self.optimizer)
        metrics["samples_per_s"] = samples / seconds if seconds > 0 else 0.0
        stop = self._decide(metrics)
        self._log_epoch(metrics)
        self.records.epoch(metrics, self.early_stopping)
        self.history.append(metrics)
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)
        self.epoch += 1
        self.samples_done = 0
        self._loss_sum, self._loss_count = torch.zeros((), dtype=torch.float64), 0
        self._agree(due=True)  # at least once an epoch, however short the steps
        if stop:
            self.stop_reason, self.stop_message = "early_stop", self.early_stopping.reason or ""
            log.info("%s", self.stop_message)
        elif self.epoch >= cfg.train.max_epochs:
            self.stop_reason = "max_epochs"
            self.stop_message = f"reached --max-epochs {cfg.train.max_epochs}"
        elif cfg.ckpt.save_every_epochs and self.epoch % cfg.ckpt.save_every_epochs == 0:
            self._save(metric=metrics.get(cfg.early_stop.monitor))

    def evaluate(self) -> dict[str, float]:
        """Exact validation over the whole set: (sum, count) reduced across ranks. Collective.

        Each rank evaluates a disjoint, unpadded shard, so the result equals a single process
        evaluating the whole set, whatever the set's size.
        """
        task = self.task
        assert task is not None and task.val_dataset is not None
        dataset, sampler = task.val_dataset, None
        if is_stream(dataset):  # this rank's readers: disjoint and unpadded too
            dataset = StreamShard(dataset, dist.rank(), dist.world_size())  # type: ignore[arg-type]
        else:
            sampler = ResumableSampler(len(dataset), num_replicas=dist.world_size(),  # type: ignore[arg-type]
                                       rank=dist.rank(), shuffle=False, pad=False)
        names = list(task.metrics)
        sums = torch.zeros(2 + len(names), dtype=torch.float64)
        self.module.eval()
        with torch.no_grad(), self._autocast():
            for inputs, target in self._loader(dataset, sampler, "val"):
                inputs, target = _to(inputs, self.device), _to(target, self.device)
                output = self._forward(self.module, inputs)
                n = _batch_len(target)
                sums[0] += float(task.loss_fn(output, target).double()) * n
                sums[1] += n
                for j, name in enumerate(names):
                    sums[2 + j] += float(task.metrics[name](output, target).double().sum())
        self.module.train()
        totals = dist.all_reduce_sum(sums.tolist())
        count = totals[1] or math.nan
        out = {"val_loss": totals[0] / count}
        out.update({f"val_{name}": totals[2 + j] / count for j, name in enumerate(names)})
        return out

    def _decide(self, metrics: dict[str, float]) -> bool:
        """Step the plateau schedule and early stopping on the monitored value; rank 0 decides
        and broadcasts its state, so every rank stops after the same epoch. Collective."""
        value = metrics.get(self.config.early_stop.monitor)
        if value is None:
            return False
        self.last_metric = value
        if isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step(value)
        es = self.early_stopping
        stop = False
        if dist.rank() == 0:
            stop = es.update(value, epoch=self.epoch)
        state = dist.broadcast_object((stop, es.state_dict(), es.improved))
        stop, es_state, improved = state
        es.load_state_dict(es_state)
        if improved and es.restore_best_weights:
            self.best_state = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.raw_module.state_dict().items()}
        return bool(stop and self.config.early_stop.early_stop)

    def _log_epoch(self, metrics: dict[str, float]) -> None:
        parts = [f"epoch {self.epoch + 1}/{self.config.train.max_epochs}"]
        for key, value in metrics.items():
            if key in ("epoch", "step", "samples_per_s", "lr"):
                continue
            parts.append(f"{key} {value:.4f}")
        parts.append(f"lr {metrics['lr']:.3g}")
        parts.append(f"{metrics['samples_per_s']:.0f} samples/s")
        if self.config.early_stop.early_stop and self.early_stopping.best_epoch is not None:
            parts.append(f"best {self.early_stopping.best:.4f} @ epoch "
                         f"{self.early_stopping.best_epoch + 1}")  # ES counts epochs from 0
        log.info(" | ".join(parts))

    # ================================================================== saving & finishing

    def _save(self, metric: float | None = None, *, final: bool = False, blocking: bool = False,
              replace: bool = False) -> None:
        """Checkpoint the full state at this optimizer-step boundary. Collective.

        ``blocking`` saves (final, emergency) return once the checkpoint is committed and skip
        the write when this very step is already committed; ``replace`` rewrites it instead.
        """
        shared, per_rank = self._snapshot()
        cfg = self.config
        es = cfg.early_stop
        meta = Meta(epoch=self._epoch_label(), world_size=dist.world_size(), final=final,
                    # the manifest is strict JSON: a NaN/inf metric is recorded as null (no rank)
                    metric=None if metric is None else Metric(
                        es.monitor, metric if math.isfinite(metric) else None, es.mode),  # type: ignore[arg-type]
                    config=cfg.to_public_dict(), config_fingerprint=cfg.fingerprint(),
                    torch=torch.__version__)
        deferrable = [*self.raw_module.parameters(),
                      *(v for st in self.optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor))]
        blocking = blocking or final
        self.checkpointer.save(self.global_step, shared, per_rank, meta, blocking=blocking,
                               replace=replace, skip_if_committed=blocking and not replace,
                               deferrable=deferrable)
        if blocking:
            dist.barrier()  # nobody exits while rank 0 is still committing

    def _finish(self) -> FitResult:
        """Restore the best weights if asked, write the final checkpoint and the COMPLETE marker.
        Collective."""
        es = self.early_stopping
        note = ""
        if es.restore_best_weights and self.best_state is not None:
            self.raw_module.load_state_dict(self.best_state)
            note = f"; weights restored from the best epoch {(es.best_epoch or 0) + 1} " \
                   f"({es.monitor} {es.best:.4f})"
        # A checkpoint of this very step may exist already (a step save on the last step, or
        # this run resumed from its own final checkpoint): it is kept, unless restore-best
        # changed the weights, which rewrites it.
        self._save(metric=self.last_metric, final=True, replace=bool(note))
        self.agreement.drain()
        if dist.any_rank(not self.checkpointer.committed(self.global_step)):
            raise SaveFailedError("the final checkpoint could not be written")
        if dist.rank() == 0:
            self.checkpointer.store.mark_complete({
                "step": self.global_step, "epoch": self.epoch, "reason": self.stop_reason,
                "config_fingerprint": self.config.fingerprint(),
                "config": self.config.to_public_dict()})
            self.checkpointer.note_progress(self.global_step, self._epoch_label(),
                                            reason="finished")
        log.info("training finished after %d epochs, %d steps: %s%s", self.epoch,
                 self.global_step, self.stop_message, note)
        self.records.end("finished", step=self.global_step, epoch=self._epoch_label(),
                         reason=self.stop_reason, message=self.stop_message + note)
        result = FitResult(self.stop_reason or "max_epochs", self.epoch, self.global_step,
                           self.history, self.stop_message + note, *self._best(), self.module)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result
