"""Optimizers and learning-rate schedules built from the configuration.

Every schedule except ``plateau`` is stepped once per optimizer step (so mid-epoch resume restores
the exact learning rate); ``step`` converts its epoch-based ``--step-size`` into optimizer steps.
``plateau`` is a ``ReduceLROnPlateau`` stepped with the globally reduced monitored metric after
each evaluation, so every rank sees the same value and changes its learning rate identically.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from distrib.config import Config

Scheduler = Union[LRScheduler, ReduceLROnPlateau]


def build_optimizer(params: Iterable[torch.nn.Parameter], config: Config) -> Optimizer:
    """The optimizer named by ``--optimizer`` with ``--lr``, ``--weight-decay`` and friends."""
    o = config.optim
    params = list(params)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.optimizer!r}")  # config validation prevents this


def _cosine(progress: float, floor: float) -> float:
    """Cosine decay from 1 to ``floor`` as ``progress`` goes from 0 to 1."""
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(config: Config, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak LR after ``step`` optimizer steps, for the per-step schedules."""
    s = config.sched
    floor = s.min_lr / config.optim.lr
    if s.scheduler == "step":
        interval = max(1, s.step_size * steps_per_epoch)
        return lambda step: float(s.gamma ** (step // interval))
    if s.scheduler == "cosine":
        return lambda step: _cosine(step / max(1, total_steps), floor)
    if s.scheduler == "warmup-cosine":
        warm = s.warmup_steps

        def warmup_cosine(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return _cosine((step - warm) / max(1, total_steps - warm), floor)
        return warmup_cosine
    return lambda step: 1.0


def build_scheduler(optimizer: Optimizer, config: Config, steps_per_epoch: int,
                    total_steps: int) -> Scheduler | None:
    """The schedule named by ``--scheduler``, or None for ``none``."""
    s = config.sched
    if s.scheduler == "none":
        return None
    if s.scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode="max" if config.early_stop.mode == "max" else "min",
                                 factor=s.plateau_factor,
                                 patience=s.plateau_patience)
    return LambdaLR(optimizer, lr_factor(config, steps_per_epoch, total_steps))


def current_lr(optimizer: Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
