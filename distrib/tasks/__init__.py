"""The task interface users implement, and the loader for ``--task MODULE:FUNCTION``.

A task is a function ``build(config: distrib.Config) -> distrib.Task``. It is called on every rank
**before** the process group exists, after ``torch.manual_seed(config.train.seed)``, so it must not
use ``torch.distributed`` and must build the same model on every rank (DDP also broadcasts rank 0's
weights at start-up). It may raise :class:`distrib.ConfigError` to reject options it does not
support; the command line turns that into a one-line error with exit code 2.

Batches: each dataset item is an ``(input, target)`` pair; the trainer calls
``loss_fn(model(input), target)``. Metrics map a name to ``fn(output, target) -> Tensor`` of one
value per sample; the trainer averages them exactly over the whole validation set, across ranks.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch.utils.data import Dataset

from distrib.config import Config, ConfigError

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], torch.Tensor]
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter], Config], torch.optim.Optimizer]
# (optimizer, config, total optimizer steps of the run) -> scheduler, stepped once per optimizer step
SchedulerFactory = Callable[[torch.optim.Optimizer, Config, int], "LRScheduler"]


@dataclass
class Task:
    """Everything the trainer needs from the user.

    Attributes:
        model: the module to train (on CPU; the trainer moves it to the rank's device).
        train_dataset: dataset of ``(input, target)`` pairs: map-style, or a stream (an
            ``IterableDataset``; see :mod:`distrib.training.data` for how ranks and workers share it).
        val_dataset: the same for validation, or None to skip validation.
        loss_fn: ``loss_fn(output, target)`` -> scalar mean loss over the batch.
        metrics: extra validation metrics, name -> per-sample values (see module docstring).
        optimizer_factory: builds the optimizer; default: from ``--optimizer`` and friends.
        scheduler_factory: builds a per-optimizer-step LR scheduler; default: from ``--scheduler``.
        collate_fn: optional ``DataLoader`` collate function.
        forward: ``forward(model, inputs) -> output``, for a model called any other way than
            the default: ``model(**inputs)`` for a mapping of inputs (Hugging Face style),
            ``model(inputs)`` otherwise. ``model`` is the DDP-wrapped module in training.
    """

    model: torch.nn.Module
    train_dataset: Dataset[Any]
    val_dataset: Dataset[Any] | None
    loss_fn: LossFn
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    optimizer_factory: OptimizerFactory | None = None
    scheduler_factory: SchedulerFactory | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    forward: Callable[[torch.nn.Module, Any], Any] | None = None


TaskBuilder = Callable[[Config], Task]


def resolve_builder(spec: str) -> TaskBuilder:
    """Import ``MODULE:FUNCTION``; a :class:`ConfigError` names what failed (exit code 2)."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--task: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # a user module that fails while importing: same clear line
        raise ConfigError(f"--task: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise ConfigError(f"--task: module {module_name!r} has no function {func_name!r}")
    return builder  # type: ignore[no-any-return]


def build_task(config: Config, builder: TaskBuilder | None = None) -> Task:
    """Seed torch, call ``builder`` (default: the one ``--task`` names), and check that it
    returned a :class:`Task` and read every ``--task-arg`` it was given.

    Any error the builder raises is a :class:`ConfigError` (the command line's exit code 2): a
    task that cannot be built from these options will not build on a retry either.
    """
    if builder is None:
        builder, name = resolve_builder(config.train.task), config.train.task
    else:
        name = f"{getattr(builder, '__module__', '?')}:{getattr(builder, '__qualname__', '?')}"
    torch.manual_seed(config.train.seed)
    view, args = _tracking(config)
    try:
        task = builder(view)
    except ConfigError:
        raise
    except (Exception, MemoryError) as exc:
        raise ConfigError(f"--task: {name} failed: {type(exc).__name__}: "
                          f"{str(exc)[:300]}") from None
    if not isinstance(task, Task):
        raise ConfigError(f"--task: {name} returned {type(task).__name__}, "
                          "expected a distrib.Task")
    unread = sorted(set(dict.keys(args)) - args.read)
    if unread:
        raise ConfigError(f"--task-arg: {name} does not use {', '.join(map(repr, unread))} "
                          f"(it reads: {', '.join(sorted(args.read)) or 'none'})")
    return task


class _ReadArgs(dict):  # type: ignore[type-arg]
    """``task_args`` that remember which keys the task looked at (iterating reads them all)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return str(super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)

    def _all(self) -> None:
        self.read |= set(super().keys())

    def keys(self) -> Any:
        self._all()
        return super().keys()

    def items(self) -> Any:
        self._all()
        return super().items()

    def values(self) -> Any:
        self._all()
        return super().values()

    def __iter__(self) -> Any:
        self._all()
        return super().__iter__()

    def copy(self) -> dict[str, str]:
        self._all()
        return dict(super().items())


def _tracking(config: Config) -> tuple[Config, _ReadArgs]:
    """A copy of ``config`` whose ``train.task_args`` records what the task reads."""
    args = _ReadArgs(config.train.task_args)
    train = dataclasses.replace(config.train)
    object.__setattr__(train, "task_args", args)  # frozen: the copy is only the task's view
    return dataclasses.replace(config, train=train), args


def task_arg(config: Config, key: str, kind: Callable[[str], Any], default: Any, *,
             lo: float | None = None, hi: float | None = None) -> Any:
    """Read a ``--task-arg KEY=VALUE`` option, converted with ``kind`` and, for numbers, checked
    to be finite and within ``[lo, hi]``; ConfigError if not."""
    raw = config.train.task_args.get(key)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"--task-arg: {key}={raw!r} is not a valid "
                          f"{getattr(kind, '__name__', 'value')}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or (lo is not None and value < lo) or \
                (hi is not None and value > hi):
            bounds = f"[{'' if lo is None else f'{lo:.12g}'}, {'' if hi is None else f'{hi:.12g}'}]"
            raise ConfigError(f"--task-arg: {key} must be a finite number in {bounds} "
                              f"(got {raw})")
    return value


def check_memory(config: Config, nbytes: float, limit: float = 16e9) -> None:
    """ConfigError if a built-in task's options would need more than ``limit`` bytes."""
    if nbytes > limit:
        raise ConfigError(f"--task-arg: these sizes need about {nbytes / 1e9:.0f} GB for "
                          f"{config.train.task} (at most {limit / 1e9:.0f} GB allowed)")


def check_task_args(config: Config, known: Iterable[str]) -> None:
    """Reject ``--task-arg`` keys the task does not understand, naming the ones it does."""
    allowed = sorted(known)
    for key in config.train.task_args:
        if key not in allowed:
            raise ConfigError(f"--task-arg: unknown key {key!r} for {config.train.task} "
                              f"(known: {', '.join(allowed) or 'none'})")
