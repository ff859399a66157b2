"""The training loop: resume -> steps -> evaluate -> decide -> save, the same on every rank.

Every rank executes the same sequence of collectives: DDP's gradient all-reduce on the last
micro-step of each optimizer step, the (sum, count) reductions at the end of an epoch, the
broadcast of rank 0's early-stopping decision, and the checkpoint gathers. Decisions that end the
loop (max steps, early stop, a fatal checkpoint failure) are either computed from globally reduced
values or broadcast, so no rank is ever left waiting in a collective another rank has left.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset

from distrib.checkpoint.manager import CheckpointManager
from distrib.checkpoint.preflight import check_locations
from distrib.checkpoint.storage import parse_options
from distrib.config import Config, ConfigError, resume_differences
from distrib.records.events import RunRecords, default_log_dir
from distrib.runtime import dist
from distrib.runtime.logs import Progress, progress_enabled
from distrib.runtime.preemption import (
    Preempted,
    PreemptionHandler,
    detach_worker_process,
    shutdown_budget_problems,
    torchrun_env_problem,
    worker_context,
)
from distrib.runtime.rng import derive_seed, seed_everything, seed_worker
from distrib.runtime.strategy import DDPStrategy, Strategy
from distrib.tasks import Task, TaskBuilder, build_task
from distrib.training import trainstate
from distrib.training.data import StreamShard, TrainStream, check_data, is_stream, stateful_loader
from distrib.training.early_stopping import EarlyStopping
from distrib.training.optim import build_optimizer, build_scheduler, current_lr
from distrib.training.sampler import ResumableSampler

log = logging.getLogger(__name__)

#: why a fit ended
StopReason = Literal["max_epochs", "max_steps", "early_stop", "already_complete"]

class Callback:
    """Hooks into the loop. Every rank calls every hook; keep collectives symmetric."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "FitResult") -> None: ...


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns (identical on every rank)."""

    stop_reason: StopReason
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

    model: torch.nn.Module  # what trains: the module as the strategy wrapped it
    #: how the model is wrapped, synchronised, clipped and saved, and who writes (DDP); the
    #: checkpoint manager gets the same object
    strategy: Strategy
    #: the checkpoint manager the trainer builds (a subclass may time or extend it)
    manager_class: type[CheckpointManager] = CheckpointManager

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
        self.stop_reason: StopReason | None = None
        self.stop_message = ""
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_metric: float | None = None
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        self._grad_norm: torch.Tensor | None = None
        self.records = RunRecords()  # disabled until _fit opens them (rank 0)
        self.strategy = DDPStrategy()

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
            manager = getattr(self, "manager", None)
            if manager is not None:  # rank 0: the writers are done, the lease is released
                manager.close(None)
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
        self.manager = self._build_manager()
        self.checkpointer = self.manager.checkpointer
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
        # state dicts without torch.compile's prefixes
        self.raw_module = self.strategy.unwrap(self.module)
        self.model = self.strategy.wrap(self.module, self.device)
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

    def _build_manager(self) -> CheckpointManager:
        """The checkpoint manager, with everything a Trainer checkpoint holds registered under
        the keys those checkpoints have always had."""
        cfg, c = self.config, self.config.ckpt
        progress = trainstate.Progress(self)
        state: dict[str, Any] = {
            "model": self.module, "optimizer": self.optimizer,
            "scheduler": trainstate.MaybeAbsent("scheduler", lambda: self.scheduler),
            "scaler": trainstate.MaybeAbsent("scaler", lambda: self.scaler),
            "early_stopping": self.early_stopping,
            "best_model": trainstate.BestModel(self), "progress": progress,
            "history": trainstate.History(self),
            "train_loss": trainstate.TrainLoss(self, progress)}
        if self.stream is not None:  # its data position: after the batches consumed so far
            state["data"] = trainstate.StreamPosition(self, progress)
        return self.manager_class(
            c.checkpoint_dir, state, per_rank=[k for k in ("train_loss", "data") if k in state],
            save_every_steps=c.save_steps(), save_every_epochs=c.save_every_epochs,
            keep_last=c.keep_last, keep_best=c.keep_best, mode=cfg.early_stop.mode,
            async_save=c.async_save, shard_size_mb=c.shard_size_mb,
            max_failed_saves=c.max_failed_saves, lease_timeout=c.lease_timeout,
            resume=c.resume, force_restart=c.force_restart, config=cfg.to_public_dict(),
            check_config=lambda saved: resume_differences(saved, cfg),
            allow_config_change=c.allow_config_change,
            log_dir=default_log_dir(c.checkpoint_dir, cfg.log.log_dir),
            tensorboard=cfg.log.tensorboard, strategy=self.strategy,
            storage_options=self.storage_options,
            samples_per_step=cfg.train.batch_size * dist.world_size()
            * cfg.train.grad_accum_steps,
            preemption=self.preemption, config_fingerprint=cfg.fingerprint(), log_progress=False,
            memory_every_steps=c.memory_steps(), memory_dir=c.memory_dir,
            mtbf_seconds=c.mtbf_hours * 3600.0)

    @property
    def storage_options(self) -> dict[str, Any]:
        return parse_options(self.config.ckpt.storage_options)

    # ================================================================== resume

    def _start(self) -> FitResult | None:
        """Resume, start fresh, or report an already complete run. Collective."""
        start = self.manager.resume()
        self.records = self.manager.records
        if start.source is not None:
            self._check_limits()
            if dist.rank() == 0:
                age = time.time() - (start.saved_at or time.time())
                log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch, saved "
                         "%.0fs ago%s", start.source, self.epoch + 1, self.global_step,
                         self.samples_done, age, start.note)
        if start.complete:
            log.info("nothing to do (use --force-restart to train again)")
            return FitResult("already_complete", self.epoch, self.global_step, self.history,
                             start.message, *self._best(), self.module if start.source else None)
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

    # ================================================================== the loop

    def _loader(self, dataset: Dataset[Any], sampler: ResumableSampler | None, purpose: str
                ) -> DataLoader[Any]:
        """A loader whose worker seeds derive from (seed, purpose, epoch, rank) and which never
        draws from the global RNG (so dropout streams are the same with or without resume).
        Without a sampler, ``dataset`` is a :class:`~distrib.training.data.StreamShard`; training reads
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
        micro-batches (see :mod:`distrib.training.data`)."""
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
                every = self.manager.save_interval
                last = bool(every) and self.global_step % every == 0 \
                    and self.manager.epoch_save_due(self.epoch + 1) and stream.is_last()
                if self._step_boundary(last_of_epoch=last):
                    return
        finally:
            stream.stop()  # left early: the position is kept for the final save
        self._end_epoch(time.perf_counter() - started, samples)

    def _micro_step(self, inputs: Any, target: Any, *, sync: bool, scale: float) -> int:
        inputs, target = _to(inputs, self.device), _to(target, self.device)
        with self.strategy.no_sync(self.model, skip=not sync):
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
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.scaler is not None and (t.clip_grad_norm or t.clip_grad_value):
            self.scaler.unscale_(self.optimizer)
        if t.clip_grad_norm:
            self._grad_norm = self.strategy.clip_grad_norm(params, t.clip_grad_norm)
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
        ending = bool(cfg.train.max_steps) and self.global_step >= cfg.train.max_steps
        self.manager.epoch = self._epoch_label()
        self.manager.step_done(self.global_step, epoch_ends=last_of_epoch, ending=ending)
        if ending:
            self.stop_reason = "max_steps"
            self.stop_message = f"reached --max-steps {cfg.train.max_steps}"
        return ending

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
        ending = stop or self.epoch >= cfg.train.max_epochs
        # agrees at least once an epoch, however short the steps; saves if due
        self.manager.epoch_done(self.epoch, metric=metrics.get(cfg.early_stop.monitor),
                                metric_name=cfg.early_stop.monitor, ending=ending)
        if stop:
            self.stop_reason, self.stop_message = "early_stop", self.early_stopping.reason or ""
            log.info("%s", self.stop_message)
        elif ending:
            self.stop_reason = "max_epochs"
            self.stop_message = f"reached --max-epochs {cfg.train.max_epochs}"

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
        self.manager.epoch = self._epoch_label()
        self.manager.finish(self.global_step, metric=self.last_metric,
                            metric_name=self.config.early_stop.monitor, replace=bool(note),
                            info={"epoch": self.epoch, "reason": self.stop_reason,
                                  "config_fingerprint": self.config.fingerprint()})
        log.info("training finished after %d epochs, %d steps: %s%s", self.epoch,
                 self.global_step, self.stop_message, note)
        self.records.end("finished", step=self.global_step, epoch=self._epoch_label(),
                         reason=self.stop_reason, message=self.stop_message + note)
        result = FitResult(self.stop_reason or "max_epochs", self.epoch, self.global_step,
                           self.history, self.stop_message + note, *self._best(), self.module)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result
