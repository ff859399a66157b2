"""The Trainer's own state as objects the :class:`~distrib.checkpoint.manager.CheckpointManager` saves like
any other: each has ``state_dict()``/``load_state_dict()`` and checks what a checkpoint holds
before anything is loaded (``check_state_dict``; per-rank ones ``check_rank_states`` and
``load_rank_states``, which see every rank's entry at once).

The names they are registered under are the keys of a Trainer checkpoint (``progress``,
``history``, ``best_model``, ``scheduler``, ``scaler``; per rank ``train_loss`` and ``data``),
unchanged from the checkpoints written before the manager existed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from distrib.checkpoint.format import InvalidCheckpoint
from distrib.checkpoint.statecheck import check_like, check_number
from distrib.runtime import dist

if TYPE_CHECKING:
    from distrib.training.trainer import Trainer


class MaybeAbsent:
    """An object that may be absent (no scheduler, no grad scaler): saved as None then, and a
    saved None is not loaded."""

    def __init__(self, name: str, get: Callable[[], Any]) -> None:
        self.name, self.get = name, get

    def state_dict(self) -> Any:
        obj = self.get()
        return None if obj is None else obj.state_dict()

    def load_state_dict(self, state: Any) -> None:
        obj = self.get()
        if obj is not None and state is not None:
            obj.load_state_dict(state)

    def check_state_dict(self, saved: Any) -> None:
        obj = self.get()
        if obj is not None and saved is not None:
            check_like(saved, obj.state_dict(), self.name, subset=True)


class Progress:
    """Where the loop is: epoch (0-based, in progress), optimizer step, samples of the epoch
    consumed over all ranks, the world size it was saved with, the last monitored value."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.checked: dict[str, Any] = {}  # the last checked state (per-rank checks use it)

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {"epoch": t.epoch, "global_step": t.global_step, "samples_done": t.samples_done,
                "world_size": dist.world_size(), "last_metric": t.last_metric}

    def check_state_dict(self, p: Any) -> None:
        if not isinstance(p, dict):
            raise InvalidCheckpoint("progress: not a mapping")
        for key in ("epoch", "global_step", "samples_done"):
            check_number(p.get(key), f"progress.{key}", integer=True)
        check_number(p.get("world_size"), "progress.world_size", integer=True, lo=1)
        check_number(p.get("last_metric"), "progress.last_metric", lo=-math.inf, optional=True)
        self.checked = p

    def load_state_dict(self, p: dict[str, Any]) -> None:
        t = self.trainer
        t.epoch, t.global_step = int(p["epoch"]), int(p["global_step"])
        t.samples_done, t.last_metric = int(p["samples_done"]), p["last_metric"]
        self.checked = p


class History:
    """The per-epoch metrics so far."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> list[dict[str, float]]:
        return self.trainer.history

    def check_state_dict(self, history: Any) -> None:
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and all(isinstance(k, str) and (v is None or isinstance(
                    v, (int, float))) for k, v in h.items()) for h in history):
            raise InvalidCheckpoint("history: not a list of metric mappings")

    def load_state_dict(self, history: list[dict[str, float]]) -> None:
        self.trainer.history = list(history)


class BestModel:
    """The weights of the best epoch so far (for ``--restore-best``), or None."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.trainer.best_state

    def check_state_dict(self, saved: Any) -> None:
        if saved is not None:
            check_like(saved, self.trainer.raw_module.state_dict(), "best model")

    def load_state_dict(self, saved: dict[str, torch.Tensor] | None) -> None:
        self.trainer.best_state = saved


class TrainLoss:
    """Per rank: the epoch's (sum, count) of training loss so far. With another world size, rank
    0 takes the sum of all saved ranks', so the epoch's global mean stays exact."""

    def __init__(self, trainer: Trainer, progress: Progress) -> None:
        self.trainer, self.progress = trainer, progress

    def state_dict(self) -> list[float]:
        t = self.trainer
        return [float(t._loss_sum), t._loss_count]

    def check_rank_states(self, states: list[Any]) -> None:
        world = self.progress.checked.get("world_size")
        if len(states) != world:
            raise InvalidCheckpoint(f"per-rank state: expected {world} entries")
        for r, entry in enumerate(states):
            if not isinstance(entry, list) or len(entry) != 2:
                raise InvalidCheckpoint(f"per-rank state of rank {r}: malformed")
            check_number(entry[0], f"rank {r} train loss", lo=-math.inf)
            check_number(entry[1], f"rank {r} sample count", integer=True)

    def load_state_dict(self, state: list[float]) -> None:
        self.load_rank_states([state], 0, 1)

    def load_rank_states(self, states: list[Any], rank: int, world: int) -> None:
        t = self.trainer
        if len(states) == world:
            t._loss_sum = torch.tensor(states[rank][0], dtype=torch.float64)
            t._loss_count = int(states[rank][1])
        elif rank == 0:
            t._loss_sum = torch.tensor(sum(s[0] for s in states), dtype=torch.float64)
            t._loss_count = sum(int(s[1]) for s in states)


class StreamPosition:
    """Per rank: a stream's data position (see :class:`distrib.training.data.TrainStream`)."""

    def __init__(self, trainer: Trainer, progress: Progress) -> None:
        self.trainer, self.progress = trainer, progress

    def state_dict(self) -> Any:
        assert self.trainer.stream is not None
        return self.trainer.stream.state()

    def check_rank_states(self, states: list[Any]) -> None:
        assert self.trainer.stream is not None
        self.trainer.stream.check(states, int(self.progress.checked.get("epoch", 0)))

    def load_rank_states(self, states: list[Any], rank: int, world: int) -> None:
        assert self.trainer.stream is not None
        self.trainer.stream.load(states, len(states), self.trainer.epoch)

    def load_state_dict(self, state: Any) -> None:
        self.load_rank_states([state], 0, 1)
