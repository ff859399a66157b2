"""A distributed sampler that can start an epoch part-way through, without loading skipped samples.

With ``start=0`` it yields exactly what ``torch.utils.data.DistributedSampler`` yields for the same
(length, world size, rank, seed, epoch): the epoch's permutation comes from a generator seeded with
``seed + epoch``, is padded by wrapping around to a multiple of the world size, and rank ``r`` takes
every ``world_size``-th index starting at ``r``.

Resuming: ``set_epoch(epoch, start=k)`` skips the first ``k`` positions of the epoch's global order
(``k`` counts samples over *all* ranks) and pads what remains. With the same world size and ``k`` a multiple of it, each
rank continues with exactly the indices it would have seen next. With another world size the
remaining global order is dealt out to the new ranks (padded again so every rank gets the same
number), which preserves the number of samples seen but not the per-rank batches.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def _wrap_pad(indices: list[int], multiple: int, source: list[int]) -> list[int]:
    """Pad ``indices`` to a multiple of ``multiple`` by cycling through ``source``."""
    missing = -len(indices) % multiple
    if missing and source:
        indices = indices + (source * math.ceil(missing / len(source)))[:missing]
    return indices


class ResumableSampler(Sampler[int]):
    """Shard ``length`` sample indices over ranks; optionally shuffled per epoch, resumable.

    Args:
        length: number of samples in the dataset.
        num_replicas: world size.
        rank: this rank.
        shuffle: permute per epoch with a generator seeded ``seed + epoch``.
        seed: base seed; must be equal on every rank.
        pad: pad so every rank gets the same count (training: ranks must step together). With
            ``pad=False`` the shards are disjoint and uneven (exact evaluation: no duplicates).
    """

    def __init__(self, length: int, *, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, pad: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not within world size {num_replicas}")
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and how many samples (over all ranks) of it were already consumed."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def _global_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            base = torch.randperm(self.length, generator=g).tolist()
        else:
            base = list(range(self.length))
        rest = base[self.start:]
        # Padding after the skip: with the same world size and a start that is a multiple of it,
        # this equals DistributedSampler's padded order with its first ``start`` entries removed.
        return _wrap_pad(rest, self.num_replicas, base) if self.pad else rest

    def __iter__(self) -> Iterator[int]:
        return iter(self._global_order()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        remaining = max(self.length - self.start, 0)
        if self.pad:
            return math.ceil(remaining / self.num_replicas)
        return len(range(self.rank, remaining, self.num_replicas))
