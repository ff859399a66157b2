"""A next-token model trained on a stream (an ``IterableDataset`` with torchdata's ``Stateful``
protocol), read by two data-loader workers per rank::

    torchrun --nproc_per_node=2 -m distrib.train --task examples.streaming:build --num-workers 2 --max-epochs 3

The stream is what a user with a corpus too big for a map-style dataset writes: documents read
in order (here generated from the seed, as a reader of shard files would open them one after
another), cut into fixed windows of tokens. It knows nothing of ranks or workers: distrib deals
its items out to every reader (each worker of each rank). Its ``state_dict()`` is the position
(document and offset) plus the state of the generator it draws noise from, so a resumed run
continues each reader's stream exactly where the checkpoint left it, without reading anything
again: the final weights are bit-identical to an uninterrupted run.

``--task-arg`` keys: ``documents`` (per epoch), ``length`` (tokens per document), ``window``,
``vocab``, ``width``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset

from distrib import Config, Task
from distrib.tasks import task_arg
from distrib.tasks.classifier import accuracy


class Documents(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``window`` tokens (input) and the token after each (target), from ``documents``
    documents of ``length`` tokens. A document is a walk through a fixed transition table, with
    a token replaced by a random one now and then (the stream's own generator, per epoch)."""

    def __init__(self, seed: int, split: int, documents: int, length: int, window: int,
                 vocab: int) -> None:
        self.seed, self.documents, self.length, self.window = seed * 2 + split, documents, \
            length, window
        # one language for both splits: the table comes from the seed alone
        self.table = torch.randint(0, vocab, (vocab,), generator=torch.Generator().manual_seed(seed))
        self.vocab = vocab
        self.epoch = 0
        self.doc, self.offset = 0, 0
        self.noise = self._noise()
        self._resumed = False

    def _noise(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _document(self, doc: int) -> torch.Tensor:
        start = (self.seed * 31 + self.epoch * 1009 + doc * 17) % self.vocab
        tokens = torch.empty(self.length, dtype=torch.long)
        tokens[0] = start
        for i in range(1, self.length):
            tokens[i] = self.table[tokens[i - 1]]
        return tokens

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._resumed:  # a new epoch; after load_state_dict, go on from the saved place
            self.doc, self.offset, self.noise = 0, 0, self._noise()
        self._resumed = False
        while self.doc < self.documents:
            tokens = self._document(self.doc)
            while self.offset + self.window < self.length:
                piece = tokens[self.offset:self.offset + self.window + 1].clone()
                if torch.rand((), generator=self.noise) < 0.1:  # a typo in the corpus
                    piece[int(torch.randint(0, self.window, (), generator=self.noise))] = \
                        int(torch.randint(0, self.vocab, (), generator=self.noise))
                self.offset += self.window
                yield piece[:-1], piece[-1]
            self.doc, self.offset = self.doc + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The position after the last window produced, and the noise generator's state."""
        return {"epoch": self.epoch, "doc": self.doc, "offset": self.offset,
                "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.doc, self.offset = int(state["epoch"]), int(state["doc"]), \
            int(state["offset"])
        self.noise = torch.Generator()
        self.noise.set_state(state["noise"])
        self._resumed = True


class NextToken(nn.Module):
    """Embed the window, mix it with a small MLP, predict the next token."""

    def __init__(self, vocab: int, window: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Sequential(nn.Flatten(), nn.Linear(window * width, width), nn.GELU(),
                                 nn.Linear(width, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(tokens))


def build(config: Config) -> Task:
    documents = task_arg(config, "documents", int, 64, lo=1, hi=10**7)
    length = task_arg(config, "length", int, 129, lo=3, hi=10**6)
    window = task_arg(config, "window", int, 8, lo=1, hi=1024)
    vocab = task_arg(config, "vocab", int, 64, lo=2, hi=10**5)
    width = task_arg(config, "width", int, 32, lo=1, hi=4096)
    if window >= length:
        from distrib import ConfigError
        raise ConfigError(f"--task-arg: window ({window}) must be shorter than length ({length})")
    seed = config.train.seed
    return Task(model=NextToken(vocab, window, width),
                train_dataset=Documents(seed, 0, documents, length, window, vocab),
                val_dataset=Documents(seed, 1, max(1, documents // 8), length, window, vocab),
                loss_fn=nn.CrossEntropyLoss(), metrics={"accuracy": accuracy})
