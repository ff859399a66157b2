"""Small tasks for the tests (importable as ``tests.tasks:NAME`` with the repo root on the path)."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from distrib import Config, Task
from distrib.tasks import task_arg
from distrib.tasks.classifier import accuracy


def _data(seed: int, n: int, features: int = 8, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def tiny(config: Config) -> Task:
    """A linear classifier on a few hundred samples: fast, deterministic, no dropout.

    task args: ``train`` and ``val`` sample counts, ``dropout`` (adds a dropout layer, to
    exercise the RNG on resume), ``width`` and ``depth`` (hidden layers, for large states).
    """
    n_train = task_arg(config, "train", int, 256)
    n_val = task_arg(config, "val", int, 101)
    dropout = task_arg(config, "dropout", float, 0.0)
    width = task_arg(config, "width", int, 16)
    layers: list[nn.Module] = [nn.Linear(8, width), nn.Tanh()]
    for _ in range(task_arg(config, "depth", int, 0)):  # extra width x width layers: big states
        layers += [nn.Linear(width, width), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 3))
    return Task(model=nn.Sequential(*layers), train_dataset=_data(config.train.seed, n_train),
                val_dataset=_data(config.train.seed + 1, n_val) if n_val else None,
                loss_fn=nn.CrossEntropyLoss(), metrics={"accuracy": accuracy})


class _RankSkewed(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Validation items whose difficulty depends on the index, so rank shards differ."""

    def __init__(self, n: int) -> None:
        self.base = _data(7, n)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return x * (1 + 3 * (i % 2)), y


def skewed(config: Config) -> Task:
    """Validation shards differ per rank (odd indices are scaled), so local values disagree."""
    task = tiny(config)
    task.val_dataset = _RankSkewed(task_arg(config, "val", int, 101))
    return task


class NanOnRank(nn.Module):
    """Wraps a model; outputs NaN on one rank from a given epoch of evaluation on."""

    def __init__(self, inner: nn.Module, rank: int, after_calls: int) -> None:
        super().__init__()
        self.inner = inner
        self.rank = rank
        self.after_calls = after_calls
        self.eval_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if not self.training:
            self.eval_calls += 1
            import torch.distributed as tdist
            me = tdist.get_rank() if tdist.is_initialized() else 0
            if me == self.rank and self.eval_calls > self.after_calls:
                return out * math.nan
        return out


def nan_on_rank1(config: Config) -> Task:
    """Validation on rank 1 produces NaN after the first few evaluation batches."""
    task = tiny(config)
    task.model = NanOnRank(task.model, rank=1, after_calls=task_arg(config, "after", int, 2))
    return task


def failing(config: Config) -> Task:
    """Rank 1 raises inside the forward pass of its 3rd training step."""
    task = tiny(config)

    class Boom(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.distributed as tdist
            self.calls += self.training
            if self.training and tdist.is_initialized() and tdist.get_rank() == 1 and self.calls == 3:
                raise RuntimeError("injected failure on rank 1")
            return self.inner(x)

    task.model = Boom(task.model)
    return task


def gated(config: Config) -> Task:
    """``tiny`` whose first training step waits until the file named by ``--task-arg gate=PATH``
    exists (at most 120 s), so a test can act while a run is known to be in progress."""
    import os
    import time

    task = tiny(config)
    gate = task_arg(config, "gate", str, "")
    opened = [not gate]

    def forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if not opened[0] and model.training:
            deadline = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
            opened[0] = True
        return model(inputs)

    task.forward = forward
    return task


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """A deterministic stream derived from the seed: ``n`` fixed samples in an order drawn per
    epoch, each with noise from the stream's own generator (seeded by seed and epoch). It is
    not Stateful: distrib resumes it by reading it again and dropping what was consumed."""

    def __init__(self, seed: int, n: int, noise: float = 0.1) -> None:
        self.data = _data(seed, n)
        self.seed, self.n, self.noise = seed, n, noise
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100003 + self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._items(0, self._generator())

    def _items(self, start: int, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed + self.epoch)).tolist()
        for i in range(start, self.n):
            x, y = self.data[order[i]]
            x = x + self.noise * torch.randn(x.shape, generator=g)
            self._position(i + 1)
            yield x, y

    def _position(self, pos: int) -> None:
        pass


class StatefulStream(Stream):
    """The same stream with torchdata's Stateful protocol: its state is the position and its
    generator's state, so a resume continues where it was without reading anything again."""

    def __init__(self, seed: int, n: int, noise: float = 0.1) -> None:
        super().__init__(seed, n, noise)
        self.pos, self.g = 0, self._generator()
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume, self._resume = self._resume, None
        self.pos, self.g = 0, self._generator()
        if resume is not None:
            self.pos = int(resume["pos"])
            self.g.set_state(resume["rng"])
        return self._items(self.pos, self.g)

    def _position(self, pos: int) -> None:
        self.pos = pos

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.g.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume = state


class SizedStream(Stream):
    def __len__(self) -> int:
        return self.n


class SizedStatefulStream(StatefulStream):
    def __len__(self) -> int:
        return self.n


def stream(config: Config) -> Task:
    """tiny's model trained on a stream (an IterableDataset).

    task args: ``train`` and ``val`` item counts, ``stateful`` (1: the Stateful stream),
    ``sized`` (1: the stream defines ``__len__``), ``val_stream`` (1: validate on a stream too,
    0: on a map-style set), ``dropout``.
    """
    task = tiny(config)
    n_train = task_arg(config, "train", int, 256)
    n_val = task_arg(config, "val", int, 101)
    kinds = {(0, 0): Stream, (1, 0): StatefulStream, (0, 1): SizedStream,
             (1, 1): SizedStatefulStream}
    kind = kinds[(task_arg(config, "stateful", int, 1), task_arg(config, "sized", int, 0))]
    task.train_dataset = kind(config.train.seed, n_train)
    if n_val and task_arg(config, "val_stream", int, 1):
        task.val_dataset = Stream(config.train.seed + 1, n_val, noise=0.0)
    return task
