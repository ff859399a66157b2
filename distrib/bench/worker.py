"""One rank of the benchmark's training jobs, started by :mod:`distrib.bench.jobs` under torchrun:
``python -m distrib.bench.worker SCENARIO ARGS_JSON OUT_JSON``.

* ``steps`` (figures 5 and 9): per repetition, in alternating order, a ``distrib`` Trainer and a
  hand-written DDP loop train the same model on the same data with the same optimizer; both
  record when every optimizer step ended and every training loss. The Trainer also records the
  time it spends agreeing on preemption notices (every few steps and every epoch end) and on the early-stopping decision
  (every epoch).
* ``ckpt`` (figure 4): per repetition, in alternating order, the Trainer without checkpoints and
  with an asynchronous checkpoint every K steps, K chosen so that a save takes ~10% of the time
  between saves.

The process group is created once for the whole job; every Trainer.fit() reuses it. Rank 0
writes the results to OUT_JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from distrib import Callback, Config, Trainer
from distrib.checkpoint.manager import CheckpointManager
from distrib.runtime import dist
from distrib.tasks import Task, build_task

Stamps = list[tuple[int, float]]  # (epoch, time an optimizer step ended)


class LossLog:
    """Wraps a loss function; keeps every training loss (not the evaluation ones)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.values = inner, []  # type: ignore[var-annotated]

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        loss = self.inner(output, target)
        if torch.is_grad_enabled():
            self.values.append(float(loss.detach()))
        return loss  # type: ignore[no-any-return]


class StepClock(Callback):
    def __init__(self) -> None:
        self.stamps: Stamps = []

    def on_step_end(self, trainer: Trainer) -> None:
        self.stamps.append((trainer.epoch, time.perf_counter()))


class TimedManager(CheckpointManager):
    """The checkpoint manager, with the time of its cross-rank agreements summed up."""

    agree_s = 0.0

    def agree(self, due: bool = False) -> None:
        started = time.perf_counter()
        try:
            super().agree(due)
        finally:
            self.agree_s += time.perf_counter() - started


class TimedTrainer(Trainer):
    """The Trainer, with the time of its cross-rank agreements and of its epochs summed up."""

    manager_class = TimedManager
    decide_s = epochs_s = 0.0

    @property
    def agree_s(self) -> float:
        return getattr(self.manager, "agree_s", 0.0)

    def _decide(self, metrics: dict[str, float]) -> bool:
        started = time.perf_counter()
        stop = super()._decide(metrics)
        self.decide_s += time.perf_counter() - started
        return stop

    def _run_epoch(self) -> None:
        started = time.perf_counter()
        super()._run_epoch()
        self.epochs_s += time.perf_counter() - started


def mean_interval(stamps: Stamps, skip: int = 3) -> float:
    """Mean time between consecutive step ends within an epoch, after ``skip`` warm-up steps."""
    gaps = [b - a for (ea, a), (eb, b) in zip(stamps[skip:], stamps[skip + 1:]) if ea == eb]
    return statistics.fmean(gaps) if gaps else math.nan


def config(args: dict[str, Any], ckpt_dir: str, *extra: str) -> Config:
    task_args = [x for k in ("features", "hidden", "depth", "samples", "val")
                 for x in ("--task-arg", f"{k}={args[k]}")]
    return Config.from_args([
        "--task", "distrib.bench.tasks:mlp", *task_args, "--batch-size", str(args["batch"]),
        "--optimizer", "adamw", "--checkpoint-dir", ckpt_dir, "--resume", "never",
        "--no-progress", "--log-level", "warning", "--log-every-steps", "0",
        "--save-every-epochs", "0", *extra])


def fit(cfg: Config, trainer_cls: type[Trainer] = Trainer) -> tuple[Trainer, Stamps, LossLog]:
    task = build_task(cfg)
    losses = LossLog(task.loss_fn)
    task.loss_fn = losses
    clock = StepClock()
    trainer = trainer_cls(cfg, task=task, callbacks=[clock])
    trainer.fit()
    return trainer, clock.stamps, losses


def hand_loop(cfg: Config) -> tuple[Stamps, LossLog]:
    """The plain DDP loop a user would write: same task, sampler order, optimizer and steps."""
    t = cfg.train
    task: Task = build_task(cfg)  # seeds torch with --seed, as the Trainer does
    losses = LossLog(task.loss_fn)
    model = DDP(task.model)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas,
                                  weight_decay=o.weight_decay)
    sampler: DistributedSampler[Any] = DistributedSampler(task.train_dataset, num_replicas=dist.world_size(),
                                 rank=dist.rank(), shuffle=True, seed=t.seed)
    stamps: Stamps = []
    for epoch in range(t.max_epochs):
        sampler.set_epoch(epoch)
        for inputs, target in DataLoader(task.train_dataset, batch_size=t.batch_size,
                                         sampler=sampler):
            loss = losses(model(inputs), target)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append((epoch, time.perf_counter()))
    return stamps, losses


def steps(args: dict[str, Any]) -> dict[str, Any]:
    """Figures 5 and 9."""
    out: dict[str, list[Any]] = {k: [] for k in (
        "distrib_step_s", "hand_step_s", "agree_s", "decide_s", "epochs_s", "max_loss_diff",
        "losses")}
    for rep in range(args["reps"]):
        cfg = config(args, os.path.join(args["dir"], f"steps-{rep}"), "--max-epochs",
                     str(args["epochs"]), "--monitor-metric", "val_loss", "--patience", "1000")
        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
            if side == 0:
                trainer, stamps, ours = fit(cfg, TimedTrainer)
                assert isinstance(trainer, TimedTrainer)
                out["distrib_step_s"].append(mean_interval(stamps))
                out["agree_s"].append(trainer.agree_s)
                out["decide_s"].append(trainer.decide_s)
                out["epochs_s"].append(trainer.epochs_s)
            else:
                hand_stamps, plain = hand_loop(cfg)
                out["hand_step_s"].append(mean_interval(hand_stamps))
        diffs = [abs(a - b) for a, b in zip(ours.values, plain.values)]
        same_count = len(ours.values) == len(plain.values)
        out["max_loss_diff"].append(max(diffs) if diffs and same_count else math.inf)
        out["losses"].append(len(diffs))
    return out


def ckpt(args: dict[str, Any]) -> dict[str, Any]:
    """Figure 4."""
    root = args["dir"]
    calib_steps = 20
    per_step = args["batch"] * dist.world_size()
    args = {**args, "samples": (calib_steps + 5) * per_step}
    trainer, stamps, _ = fit(config(args, os.path.join(root, "calibrate"), "--max-steps",
                                    str(calib_steps), "--monitor-metric", "train_loss",
                                    "--no-early-stop"))
    step_s, save_s = dist.broadcast_object(
        (mean_interval(stamps), trainer.checkpointer.last_save_seconds))
    every = max(2, math.ceil(10 * save_s / step_s))
    total = args["saves"] * every + every // 2
    args = {**args, "samples": (total + 5) * per_step}  # one epoch: no epoch end inside
    out: dict[str, Any] = {"every_k": every, "steps": total, "calibration_step_s": step_s,
                           "calibration_save_s": save_s, "plain_step_s": [], "ckpt_step_s": [],
                           "saves_waited_s": []}
    for rep in range(args["reps"]):
        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
            extra = ["--max-steps", str(total), "--monitor-metric", "train_loss", "--no-early-stop",
                     "--save-every-steps", str(every if side else 0), "--async-save"]
            trainer, stamps, _ = fit(config(args, os.path.join(root, f"r{rep}-{side}"), *extra))
            out["ckpt_step_s" if side else "plain_step_s"].append(mean_interval(stamps))
            if side:
                out["saves_waited_s"].append(trainer.checkpointer.fence_seconds)
    return out


def main() -> int:
    scenario, raw, out_path = sys.argv[1:4]
    args = json.loads(raw)
    torch.set_num_threads(1)
    dist.setup(300.0)
    try:
        result = {"steps": steps, "ckpt": ckpt}[scenario](args)
        if dist.rank() == 0:
            with open(out_path, "w") as fh:
                json.dump(result, fh)
        dist.barrier()
    finally:
        dist.teardown(graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
