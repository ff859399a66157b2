"""How the model is parallelised and who writes checkpoints: one small seam.

The trainer and the checkpoint manager never touch DDP directly: they wrap and unwrap the model,
skip gradient synchronisation, clip gradients, get and load model and optimizer state, and ask
which rank writes, through a :class:`Strategy`. :class:`DDPStrategy` (data parallel, every rank
holding the full model, rank 0 writing) is the one there is; FSDP or several writers would be
another implementation of the same few methods, not changes to the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, ContextManager, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib.runtime import dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


class Strategy(Protocol):
    """What the loop and the checkpoint manager need to know about the parallelism."""

    #: the rank that writes checkpoints (the others' per-rank state is gathered to it)
    writer_rank: int

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to train with (``module`` itself, or a wrapper around it)."""
        ...

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The user's module inside any wrappers (DDP, ``torch.compile``)."""
        ...

    def no_sync(self, model: torch.nn.Module, skip: bool) -> ContextManager[Any]:
        """A context in which backward does not synchronise gradients (when ``skip``)."""
        ...

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float
                       ) -> torch.Tensor:
        """Clip the global gradient norm; return it."""
        ...

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]: ...
    def load_model_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None: ...
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]: ...
    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None: ...


class DDPStrategy:
    """DistributedDataParallel: every rank holds the full model and optimizer state (after each
    step they are identical), so rank 0 alone writes them; gradients are all-reduced by DDP."""

    writer_rank = 0

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if dist.world_size() == 1:
            return module
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap(model)

    def no_sync(self, model: torch.nn.Module, skip: bool) -> ContextManager[Any]:
        return model.no_sync() if skip and isinstance(model, DDP) else contextlib.nullcontext()

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float
                       ) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        return self.unwrap(module).state_dict()

    def load_model_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        self.unwrap(module).load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)
