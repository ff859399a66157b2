"""The resumable sampler: DistributedSampler-identical, resumable mid-epoch, elastic."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from distrib.training.sampler import ResumableSampler


@given(n=st.integers(0, 200), world=st.integers(1, 8), seed=st.integers(0, 5),
       epoch=st.integers(0, 3), shuffle=st.booleans())
@settings(max_examples=150, deadline=None)
def test_identical_to_distributed_sampler(n: int, world: int, seed: int, epoch: int,
                                          shuffle: bool) -> None:
    for rank in range(world):
        ours = ResumableSampler(n, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                    seed=seed)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs)


@given(n=st.integers(1, 200), world=st.integers(1, 8), consumed=st.integers(0, 30))
@settings(max_examples=150, deadline=None)
def test_resume_continues_each_rank_exactly(n: int, world: int, consumed: int) -> None:
    for rank in range(world):
        full = ResumableSampler(n, num_replicas=world, rank=rank, seed=3)
        full.set_epoch(2)
        expected = list(full)[consumed:]
        resumed = ResumableSampler(n, num_replicas=world, rank=rank, seed=3)
        resumed.set_epoch(2, start=consumed * world)
        assert list(resumed) == expected
        assert len(resumed) == len(expected)


@given(n=st.integers(1, 200), old=st.integers(1, 8), new=st.integers(1, 8),
       consumed=st.integers(0, 30))
@settings(max_examples=150, deadline=None)
def test_world_size_change_keeps_the_remaining_samples(n: int, old: int, new: int,
                                                       consumed: int) -> None:
    """After a scale-up or -down, the new ranks together see exactly the samples the old job had
    not yet seen this epoch (plus padding), and every new rank gets the same count."""
    order = list(ResumableSampler(n, num_replicas=1, rank=0, seed=1, pad=False))  # global order
    start = consumed * old
    shards = []
    for rank in range(new):
        s = ResumableSampler(n, num_replicas=new, rank=rank, seed=1)
        s.set_epoch(0, start=start)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(shard) for shard in shards}) == 1
    seen = Counter(i for shard in shards for i in shard)
    remaining = Counter(order[start:])
    assert remaining - seen == Counter()  # nothing skipped
    assert sum(seen.values()) - sum(remaining.values()) < new  # only padding added


def test_unpadded_shards_are_disjoint_and_complete() -> None:
    shards = [list(ResumableSampler(101, num_replicas=2, rank=r, shuffle=False, pad=False))
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(101))
    assert [len(s) for s in shards] == [51, 50]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ResumableSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        ResumableSampler(10, num_replicas=2, rank=0).set_epoch(0, start=-1)
