"""A resume reads a checkpoint's tensors straight into the live objects' matching tensors (no
allocation, nothing copied at load_state_dict), and a read that fails half-way never leaves the
objects half-loaded for training: another checkpoint is loaded over them in full, or the resume
is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distrib import CheckpointManager
from distrib.checkpoint.serialization import flatten_state, live_targets, plan_layout
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointError, CheckpointStore, CorruptCheckpoint


def _objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()  # optimizer state exists
    return model, optimizer


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    _, tensors = flatten_state(_state(model, optimizer))
    return [t.clone() for t in tensors]


def test_a_read_fills_the_live_tensors_in_place(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    saved = _objects(1)
    store.save_state(1, _state(*saved))
    model, optimizer = _objects(2)
    pointers = [t.data_ptr() for t in _flat(model, optimizer)]
    live = [p.data_ptr() for p in model.parameters()]
    loaded = store.read(store.inspect(1), into=_state(model, optimizer))
    state = loaded.state()
    assert state["model"]["0.weight"].data_ptr() == live[0]  # the live tensor itself
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(_flat(model, optimizer), _flat(*saved)))
    assert [p.data_ptr() for p in model.parameters()] == live
    assert len(pointers) == len(_flat(model, optimizer))


def test_only_tensors_that_fit_are_targets_and_tied_weights_once() -> None:
    shared = torch.zeros(4, 4)
    live = {"a": shared, "b": shared, "c": torch.zeros(3), "d": torch.zeros(2, dtype=torch.int64),
            "e": torch.zeros(4, 4).t(), "f": {"g": torch.zeros(5)}}
    saved = {"a": torch.ones(4, 4), "b": torch.ones(4, 4), "c": torch.ones(4),
             "d": torch.ones(2), "e": torch.ones(4, 4), "f": {"g": torch.ones(5)},
             "extra": torch.ones(1)}
    skeleton, tensors = flatten_state(saved)
    targets = live_targets(skeleton, plan_layout(tensors), live)
    chosen = {id(t.untyped_storage()) for t in targets.values()}
    # a (b shares its memory), g; not c (shape), d (dtype), e (not contiguous), extra (absent)
    assert len(targets) == 2 and id(live["f"]["g"].untyped_storage()) in chosen


def test_a_damaged_newest_checkpoint_is_replaced_in_full_by_the_older_one(
        tmp_path: Path) -> None:
    older, newer = _objects(1), _objects(2)
    manager = CheckpointManager(str(tmp_path), {"model": older[0], "optimizer": older[1]},
                                handle_signals=False, log_dir=None, lease_timeout=0,
                                shard_size_mb=0.004)  # many shards: the damage is in the last
    manager.resume()
    manager.save(1, blocking=True)
    manager.objects = {"model": newer[0], "optimizer": newer[1]}
    manager.save(2, blocking=True)
    manager.close()
    shards = sorted((tmp_path / "step-000000002").glob("shard-*"))
    assert len(shards) > 3
    shards[-1].write_bytes(b"\0" * shards[-1].stat().st_size)

    model, optimizer = _objects(3)
    resumed = CheckpointManager(str(tmp_path), {"model": model, "optimizer": optimizer},
                                handle_signals=False, log_dir=None, lease_timeout=0)
    start = resumed.resume()
    resumed.close()
    assert start.step == 1 and start.skipped and "checksum" in start.skipped[0]
    assert all(torch.equal(a, b) for a, b in zip(_flat(model, optimizer), _flat(*older)))


def test_a_failed_read_with_nothing_to_fall_back_on_is_an_error(tmp_path: Path) -> None:
    saved = _objects(1)
    manager = CheckpointManager(str(tmp_path), {"model": saved[0], "optimizer": saved[1]},
                                handle_signals=False, log_dir=None, lease_timeout=0,
                                shard_size_mb=0.004)
    manager.resume()
    manager.save(1, blocking=True)
    manager.close()
    shard = sorted((tmp_path / "step-000000001").glob("shard-*"))[-1]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    model, optimizer = _objects(3)
    before = _flat(model, optimizer)
    resumed = CheckpointManager(str(tmp_path), {"model": model, "optimizer": optimizer},
                                handle_signals=False, log_dir=None, lease_timeout=0)
    with pytest.raises(CheckpointError, match="none can be used"):
        resumed.resume()
    resumed.close()
    # why it must be an error and never a fresh start: the objects hold part of the checkpoint
    assert not all(torch.equal(a, b) for a, b in zip(before, _flat(model, optimizer)))
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    with pytest.raises(CorruptCheckpoint):
        store.read(store.inspect(1), into=_state(model, optimizer))
