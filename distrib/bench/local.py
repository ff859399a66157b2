"""Figures 1, 2, 3 and 8: saving a full training state to local disk, in this process.

The state is what the trainer checkpoints for a stack of ``Linear`` layers trained with Adam:
the model's state dict plus the optimizer's (two moment buffers per parameter), about three times
the parameter bytes. The baselines are written out below in plain Python so that a reader sees
exactly what a save is compared with.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any

import torch
from torch import nn

from distrib.bench.core import (
    MB,
    Figure,
    Settings,
    figure,
    fitted_exponents,
    fsync_write,
    interleave,
    timed,
)
from distrib.bench.tasks import layer_plan
from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore


class TrainingState:
    """A model of ``Linear(w, w)`` layers and an Adam optimizer that has taken one step, sized so
    that model + optimizer state is at least ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        width, layers = layer_plan(nbytes)
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        for p in self.model.parameters():
            p.grad = torch.randn_like(p)
        self.optimizer.step()
        self.width, self.layers = width, layers

    def state(self) -> dict[str, Any]:
        """What the trainer hands to a checkpoint."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def deferrable(self) -> list[torch.Tensor]:
        """Parameters and optimizer state: unchanged until the next optimizer step."""
        return [*self.model.parameters(), *(v for st in self.optimizer.state.values()
                                            for v in st.values() if isinstance(v, torch.Tensor))]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deferrable())

    def step_compute(self, batch: int = 8) -> None:
        """One forward and backward pass (what the training thread does next)."""
        x = torch.randn(batch, self.width)
        self.model(x).square().mean().backward()


class Saver:
    """A checkpointer on local disk that saves ``state`` under fresh steps and removes each
    checkpoint again outside the timed part."""

    def __init__(self, root: str, async_save: bool) -> None:
        self.store = CheckpointStore(LocalStorage(root))
        self.checkpointer = Checkpointer(self.store, rank=0, async_save=async_save, keep_last=10**6)
        self.step = 0
        self.bytes = 0

    def save(self, state: TrainingState, blocking: bool = True) -> float:
        """A synchronous save, fsync and directory rename included; returns its seconds."""
        self.step += 1
        seconds = timed(lambda: self.checkpointer.save(
            self.step, state.state(), {}, {}, blocking=blocking, deferrable=state.deferrable()))
        self.done()
        return seconds

    def done(self) -> None:
        """Wait for a write in flight, record its size, delete it."""
        assert not self.checkpointer.wait(), "a benchmark save failed"
        info = self.store.inspect(self.step)
        self.bytes = info.size
        self.store.delete(info)


def _sub(settings: Settings, name: str) -> str:
    path = os.path.join(settings.workdir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def raw_write_side(root: str, nbytes: int) -> tuple[Any, Any]:
    """The raw baseline of figure 1: ``nbytes`` from one buffer to one new file, fsync'd."""
    data = bytearray(b"\x01") * nbytes  # written to, so no page faults are timed
    view = memoryview(data)
    path = os.path.join(root, "raw.bin")

    def side() -> float:
        seconds = timed(lambda: fsync_write(path, view))
        os.remove(path)
        return seconds
    return side, data


def torch_save_side(root: str, state: TrainingState) -> Any:
    """The baseline of figure 2: ``torch.save`` of the same state to one file, then fsync."""
    path = os.path.join(root, "state.pt")

    def run() -> None:
        with open(path, "wb") as fh:
            torch.save(state.state(), fh)
            fh.flush()
            os.fsync(fh.fileno())

    def side() -> float:
        seconds = timed(run)
        os.remove(path)
        return seconds
    return side


def figures_1_2(settings: Settings, state: TrainingState) -> list[Figure]:
    root = _sub(settings, "save")
    saver = Saver(root, async_save=False)
    saver.save(state)  # warm-up, and learn the checkpoint's byte count
    raw, _keep = raw_write_side(root, saver.bytes)
    ours, plain, tsave = interleave(settings.reps, [lambda: saver.save(state), raw,
                                                    torch_save_side(root, state)])
    sizes = {"state_mb": round(saver.bytes / MB, 1), "layers": state.layers, "width": state.width}
    times = {"save_s": ours, "raw_write_s": plain, "torch_save_s": tsave}
    note = f"{sizes['state_mb']:.0f} MB"
    f1 = figure(1, [p / o for o, p in zip(ours, plain)], sizes, times, note)
    f2 = figure(2, [t / o for o, t in zip(ours, tsave)], sizes, times, note)
    shutil.rmtree(root, ignore_errors=True)
    return [f1, f2]


def figure_3(settings: Settings, state: TrainingState) -> Figure:
    """Async stall = time inside ``save()`` plus the wait at the next optimizer step for the
    background copy, after one forward/backward pass ran beside it (what the trainer does)."""
    root = _sub(settings, "async")
    sync, background = Saver(root, async_save=False), Saver(root, async_save=True)
    parts: dict[str, list[float]] = {"save_call_s": [], "fence_s": [], "step_compute_s": []}

    def stall() -> float:
        background.step = sync.step = max(background.step, sync.step) + 1
        call = timed(lambda: background.checkpointer.save(
            background.step, state.state(), {}, {}, deferrable=state.deferrable()))
        compute = timed(state.step_compute)
        fence = timed(background.checkpointer.fence)
        background.done()
        parts["save_call_s"].append(call)
        parts["fence_s"].append(fence)
        parts["step_compute_s"].append(compute)
        return call + fence

    def blocking() -> float:
        sync.step = background.step = max(background.step, sync.step) + 1
        return sync.save(state)

    stalls, syncs = interleave(settings.reps, [stall, blocking])
    shutil.rmtree(root, ignore_errors=True)
    return figure(3, [s / t for s, t in zip(stalls, syncs)],
                  {"state_mb": round(state.nbytes() / MB, 1)},
                  {"stall_s": stalls, "sync_save_s": syncs, **parts})


def figure_8(settings: Settings) -> Figure:
    """Exponent of save time vs size, fitted per repetition over sizes s/8, s/2 and 2s."""
    sizes_mb = [settings.size_mb / 8, settings.size_mb / 2, settings.size_mb * 2]
    states = [TrainingState(int(mb * MB)) for mb in sizes_mb]
    root = _sub(settings, "scale")
    saver = Saver(root, async_save=False)
    saver.save(states[0])  # warm-up
    columns = interleave(settings.reps, [functools.partial(saver.save, s) for s in states])
    exponents = fitted_exponents([s.nbytes() for s in states], columns, settings.reps)
    shutil.rmtree(root, ignore_errors=True)
    mbs = [round(s.nbytes() / MB) for s in states]
    return figure(8, exponents, {"sizes_mb": mbs},
                  {f"save_s_{mb}mb": col for mb, col in zip(mbs, columns)},
                  f"{'/'.join(map(str, mbs))} MB")
