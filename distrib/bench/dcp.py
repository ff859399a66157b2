"""Figures 13, 14 and 15: distrib's checkpoints against ``torch.distributed.checkpoint`` (DCP)
on the same training state and the same disk, in one process (DCP needs no process group there).
Figure 16: the memory tier's snapshot cost against the state's size.

* 13: synchronous save: ``dcp.save`` time / distrib's save time (both fsync their files).
* 14: asynchronous save, the training thread's stall: ``dcp.async_save``'s call (it stages a
  copy before returning) / distrib's stall (the ``save`` call plus the wait for the background
  copy at the next optimizer step, after one forward and backward pass ran beside it).
* 15: load into the live model and optimizer: ``dcp.load`` into their existing tensors / distrib's
  verified read (every checksum) straight into those tensors, plus ``load_state_dict`` (which
  then copies nothing: the state holds the live tensors).
* 16: the memory tier: one synchronous snapshot into the memory directory (``/dev/shm``) at
  three sizes; the figure is the fitted exponent of time against size.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from typing import Any

from distrib.bench.core import MB, Figure, Settings, figure, fitted_exponents, interleave, timed
from distrib.bench.local import Saver, TrainingState, _sub
from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.memory import DEFAULT_DIR, SLOTS
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")
    return dcp


def figures_13_15(settings: Settings, state: TrainingState) -> list[Figure]:
    dcp = _dcp()
    root = _sub(settings, "dcp")
    ours = Saver(os.path.join(root, "ours"), async_save=False)
    background = Saver(os.path.join(root, "async"), async_save=True)
    ours.save(state)  # warm-up, and learn the checkpoint's byte count
    counter = [0]

    def fresh() -> str:
        counter[0] += 1
        return os.path.join(root, f"dcp-{counter[0]}")

    def dcp_save() -> float:
        path = fresh()
        seconds = timed(lambda: dcp.save(state.state(), checkpoint_id=path))
        shutil.rmtree(path)
        return seconds

    def our_stall() -> float:
        background.step += 1
        call = timed(lambda: background.checkpointer.save(
            background.step, state.state(), {}, {}, deferrable=state.deferrable()))
        state.step_compute()
        fence = timed(background.checkpointer.fence)
        background.done()
        return call + fence

    def dcp_stall() -> float:
        path = fresh()
        future: list[Any] = []
        seconds = timed(lambda: future.append(dcp.async_save(state.state(), checkpoint_id=path)))
        future[0].result()
        shutil.rmtree(path)
        return seconds

    saves, dcp_saves, stalls, dcp_stalls = interleave(
        settings.reps, [lambda: ours.save(state), dcp_save, our_stall, dcp_stall])

    # loading: one checkpoint of each kind, read back into the live objects
    ours.step += 1
    ours.checkpointer.save(ours.step, state.state(), {}, {}, blocking=True)
    info = ours.store.inspect(ours.step)
    dcp_path = fresh()
    dcp.save(state.state(), checkpoint_id=dcp_path)
    parts: dict[str, list[float]] = {"read_verify_s": [], "load_state_dict_s": []}

    def our_load() -> float:
        loaded: list[Any] = []
        read = timed(lambda: loaded.append(ours.store.read(info, into=state.state()).state()))
        apply = timed(lambda: (state.model.load_state_dict(loaded[0]["model"]),
                               state.optimizer.load_state_dict(loaded[0]["optimizer"])))
        parts["read_verify_s"].append(read)
        parts["load_state_dict_s"].append(apply)
        return read + apply

    def dcp_load() -> float:
        return timed(lambda: dcp.load(state.state(), checkpoint_id=dcp_path))

    loads, dcp_loads = interleave(settings.reps, [our_load, dcp_load])
    shutil.rmtree(root, ignore_errors=True)
    sizes = {"state_mb": round(ours.bytes / MB, 1)}
    note = f"{sizes['state_mb']:.0f} MB"
    times = {"save_s": saves, "dcp_save_s": dcp_saves, "stall_s": stalls,
             "dcp_async_stall_s": dcp_stalls, "load_s": loads, "dcp_load_s": dcp_loads, **parts}
    return [figure(13, [d / o for o, d in zip(saves, dcp_saves)], sizes, times, note),
            figure(14, [d / o for o, d in zip(stalls, dcp_stalls)], sizes, times, note),
            figure(15, [d / o for o, d in zip(loads, dcp_loads)], sizes, times, note)]


def figure_16(settings: Settings) -> Figure:
    """Exponent of memory-tier snapshot time vs size, fitted per repetition over sizes s/8, s
    and 4s (64 MB, 512 MB and 2 GB by default), written where the memory tier writes."""
    sizes_mb = [settings.size_mb / 8, settings.size_mb, settings.size_mb * 4]
    where = DEFAULT_DIR if os.path.isdir(DEFAULT_DIR) else settings.workdir
    root = tempfile.mkdtemp(prefix=".distrib-bench-", dir=where)
    try:
        store = CheckpointStore(LocalStorage(root))
        tier = Checkpointer(store, rank=0, async_save=False, keep_last=SLOTS, slots=SLOTS,
                            label="memory snapshot")
        step = [0]

        def snapshot(state: TrainingState) -> float:
            step[0] += 1
            return timed(lambda: tier.save(step[0], state.state(), {}, {}, blocking=True))

        columns: list[list[float]] = []
        nbytes: list[int] = []
        for mb in sizes_mb:  # one state at a time: 2 GB states do not all fit in memory at once
            state = TrainingState(int(mb * MB))
            snapshot(state)  # warm-up
            columns.append(interleave(settings.reps, [functools.partial(snapshot, state)])[0])
            nbytes.append(state.nbytes())
            del state
    finally:
        shutil.rmtree(root, ignore_errors=True)
    exponents = fitted_exponents(nbytes, columns, settings.reps)
    mbs = [round(n / MB) for n in nbytes]
    return figure(16, exponents, {"sizes_mb": mbs, "where": where},
                  {f"snapshot_s_{mb}mb": col for mb, col in zip(mbs, columns)},
                  f"{'/'.join(map(str, mbs))} MB in {where}")
