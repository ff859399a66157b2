"""One contract for the checkpoint store, run against every backend: a local directory,
``memory://`` and an S3 server (moto) on loopback."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.storage import Storage, open_storage
from distrib.checkpoint.store import COMPLETE, MANIFEST, CheckpointStore, CorruptCheckpoint, step_dir

from .ckpt_helpers import assert_same, training_state


@pytest.fixture(params=["local", "memory", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    return str(request.getfixturevalue("s3_url"))


def _store(url: str, shard_bytes: int = 4096) -> CheckpointStore:
    return CheckpointStore(open_storage(url), shard_bytes=shard_bytes)


def _meta(epoch: int = 0, metric: float | None = None) -> dict[str, Any]:
    return {"epoch": epoch, "metric": None if metric is None else
            {"name": "val_loss", "value": metric, "mode": "min"}}


def _damage(storage: Storage, path: str, how: str) -> None:
    data = bytearray(storage.read(path))
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"{not json")
    storage.delete(path)
    storage.write(path, [bytes(data)])


def test_round_trip_is_bit_identical_across_many_shards(url: str) -> None:
    store = _store(url)
    state = training_state(width=96)  # ~40 kB of tensors: about ten 4 kB shards
    info = store.save_state(12, state, _meta())
    shards = info.manifest.shards  # type: ignore[union-attr]
    assert len(shards) >= 8 and all(f.size <= 4096 for f in shards)
    assert_same(state, store.load_state(store.latest()))  # type: ignore[arg-type]
    # piecemeal: the model alone comes from the first shards only
    assert_same(state["model"], store.load_state(info, subtree="model"))


def test_scan_classifies_and_latest_skips_damage(url: str) -> None:
    store = _store(url)
    for step in (1, 2, 3, 4):
        store.save_state(step, training_state(step), _meta(step))
    s = store.storage
    shard = lambda step: store.inspect(step).manifest.shards[0].name  # type: ignore[union-attr]  # noqa: E731
    _damage(s, f"{step_dir(4)}/{MANIFEST}", "garbage")
    _damage(s, f"{step_dir(3)}/{shard(3)}", "truncate")
    _damage(s, f"{step_dir(2)}/{shard(2)}", "flip")
    statuses = {i.step: i.status for i in store.scan()}
    assert statuses == {1: "valid", 2: "valid", 3: "invalid", 4: "invalid"}
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        store.read(store.inspect(2))
    ckpt = Checkpointer(store, rank=0)
    plan, loaded = ckpt.plan_start("auto", False, {})
    assert plan.kind == "resume" and plan.name == step_dir(1)
    assert len(plan.skipped) == 3 and any("checksum" in s for s in plan.skipped)
    assert_same(training_state(1)["model"], ckpt.load(plan, loaded, {})[0]["model"])


def test_all_damaged_is_an_error_not_a_fresh_start(url: str) -> None:
    store = _store(url)
    store.save_state(5, training_state(), _meta())
    _damage(store.storage, f"{step_dir(5)}/{MANIFEST}", "garbage")
    plan, _ = Checkpointer(store, rank=0).plan_start("auto", False, {})
    assert plan.kind == "error" and "none can be used" in plan.message


def test_racing_writers_exactly_one_wins(url: str) -> None:
    store = _store(url)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []
    states = [training_state(seed) for seed in range(4)]  # global RNG: build before the threads

    def writer(seed: int) -> None:
        barrier.wait()
        try:
            store.save_state(7, states[seed], _meta())
            outcomes.append(f"won:{seed}")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 3
    winner_seed = int(winners[0].split(":")[1])
    assert_same(training_state(winner_seed)["model"], store.load_state(store.inspect(7), "model"))
    names = store.storage.list(step_dir(7))
    assert len(names) == len(store.inspect(7).manifest.files) + 1  # type: ignore[union-attr]  # losers cleaned up
    assert [n for n in store.storage.list("") if n.startswith(".")] == []


def test_retention_keeps_last_and_best_deleting_manifest_first(url: str) -> None:
    store = _store(url)
    metrics = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.7, 5: 0.8}
    for step, metric in metrics.items():
        store.save_state(step, {"w": torch.full((3,), float(step))}, _meta(step, metric))
    store.storage.mkdir(step_dir(0))  # an orphan: never committed, older than the newest
    store.storage.write(f"{step_dir(0)}/shard-00000-dead.bin", [b"x" * 10])
    calls: list[str] = []
    delete, delete_tree = store.storage.delete, store.storage.delete_tree
    store.storage.delete = lambda rel: (calls.append(rel), delete(rel))[1]  # type: ignore[method-assign]
    store.storage.delete_tree = lambda rel: (calls.append(rel + "/"), delete_tree(rel))[1]  # type: ignore[method-assign]
    ckpt = Checkpointer(store, rank=0, keep_last=2, keep_best=1, mode="min")
    ckpt._prune(5)
    assert [i.step for i in store.scan()] == [2, 4, 5]
    assert step_dir(0) not in store.storage.list("")
    for step in (1, 3):  # the manifest goes before the data
        assert calls.index(f"{step_dir(step)}/{MANIFEST}") < calls.index(f"{step_dir(step)}/")


def test_completion_marker(url: str) -> None:
    store = _store(url)
    assert store.completion() is None
    store.mark_complete({"step": 3, "reason": "early_stop"})
    assert store.completion() == {"step": 3, "reason": "early_stop"}
    assert COMPLETE in store.storage.list("")
    store.clear_complete()
    assert store.completion() is None


def test_async_save_overlaps_and_reports_errors(url: str, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    store = _store(url, shard_bytes=1 << 20)
    ckpt = Checkpointer(store, rank=0, async_save=True, max_failed_saves=2)
    state = training_state()
    ckpt.save(1, state, {"rng": 1}, _meta())
    ckpt.save(2, state, {"rng": 2}, _meta())  # waits for step 1, then writes step 2
    assert ckpt.wait() is False
    assert [i.step for i in store.scan()] == [1, 2]
    assert store.load_state(store.latest())["per_rank"] == [{"rng": 2}]  # type: ignore[arg-type]
    # a save of an already committed step fails in the background; two in a row are fatal
    with caplog.at_level(logging.ERROR, logger="distrib"):
        ckpt.save(2, state, {}, _meta())
        assert ckpt.wait() is False and ckpt.failures == 1
        ckpt.save(2, state, {}, _meta())
        assert ckpt.wait() is True
    assert "checkpoint step 2 failed (2/2 consecutive)" in caplog.text


def test_a_leftover_at_the_step_is_replaced_and_an_invalid_checkpoint_too(url: str) -> None:
    """A half-deleted directory (no manifest) or an invalid checkpoint at the step being saved
    is replaced; a valid one is never overwritten without ``replace``."""
    store = _store(url)
    store.storage.write(f"{step_dir(3)}/shard-00000-dead.bin", [b"x" * 10])  # a leftover
    store.save_state(3, training_state(3), _meta())
    assert store.inspect(3).status == "valid"
    _damage(store.storage, f"{step_dir(3)}/{MANIFEST}", "garbage")
    assert store.inspect(3).status == "invalid"
    store.save_state(3, training_state(4), _meta())
    assert_same(training_state(4)["model"], store.load_state(store.inspect(3), "model"))
    with pytest.raises(FileExistsError):
        store.save_state(3, training_state(5), _meta())
    store.save_state(3, training_state(5), _meta(), replace=True)
    assert_same(training_state(5)["model"], store.load_state(store.inspect(3), "model"))
