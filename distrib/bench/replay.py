"""One rank of figure 10's jobs, started by :mod:`distrib.bench.tier` under torchrun:
``python -m distrib.bench.replay MODE ARGS_JSON OUT_DIR``. A plain DDP loop over the bench
``mlp`` task drives a :class:`~distrib.checkpoint.manager.CheckpointManager` directly.

* ``calibrate``: alternating, the training-thread stall of single durable asynchronous saves
  and of single memory-tier snapshots (the ``save`` or ``snapshot`` call plus the wait for the
  background copy at the next optimizer step; each write is left to finish before the next one
  starts) and each write's duration; and the step time with no checkpoints (the median of the
  mean step time of a long block of steps and of a short block before every save). Rank 0
  writes ``calibrate.json`` (per save, the largest of the ranks' values).
* ``train``: train with durable saves every ``durable_every`` steps and/or snapshots every
  ``memory_every`` steps until killed. Rank 0 appends ``STEP SECONDS`` to
  ``steps-<restart>.log`` (flushed) as soon as each optimizer step is done, before the manager
  sees it, so the newest line is the last step completed. A launch after a restart records where
  it resumed (``resume-<restart>.json``: ``Resume.step`` and source) and exits.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from distrib import Config
from distrib.checkpoint.manager import CheckpointManager
from distrib.runtime import dist
from distrib.tasks import build_task


class Loop:
    """The model, optimizer, data and manager of one rank."""

    def __init__(self, args: dict[str, Any], **manager: Any) -> None:
        task_args = [x for k in ("features", "hidden", "depth", "samples")
                     for x in ("--task-arg", f"{k}={args[k]}")]
        task = build_task(Config.from_args(["--task", "distrib.bench.tasks:mlp", *task_args]))
        self.model = DDP(task.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.loss_fn = task.loss_fn
        x, y = task.train_dataset.tensors  # type: ignore[attr-defined]
        self.x, self.y, self.batch = x, y, int(args["batch"])
        self.manager = CheckpointManager(
            args["ckpt"], {"model": self.model, "optimizer": self.optimizer},
            handle_signals=False, log_dir=None, log_progress=False, keep_last=2, **manager)

    def step(self, step: int) -> None:
        """One optimizer step on this rank's slice of batch ``step`` (no manager call)."""
        n = len(self.x) - self.batch
        start = (step * dist.world_size() + dist.rank()) * self.batch % n
        loss = self.loss_fn(self.model(self.x[start:start + self.batch]),
                            self.y[start:start + self.batch])
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def calibrate(args: dict[str, Any], out: str) -> None:
    loop = Loop(args, save_every_steps=0, memory_every_steps=10**9,
                memory_dir=args["memory_dir"])
    manager = loop.manager
    assert manager.memory is not None
    step = manager.resume().step

    def run(n: int) -> float:
        nonlocal step
        started = time.perf_counter()
        for _ in range(n):
            loop.step(step)
            step += 1
            manager.step_done(step)
        return (time.perf_counter() - started) / n

    run(5)  # warm-up
    plain = [run(args["plain_steps"])]
    tiers: dict[str, tuple[Callable[[int], None], Any]] = {
        "durable": (manager.save, manager.checkpointer),
        "memory": (manager.snapshot, manager.memory.checkpointer)}
    stalls: dict[str, list[float]] = {k: [] for k in tiers}
    writes: dict[str, list[float]] = {k: [] for k in tiers}
    for i in range(-1, args["saves"]):  # -1: a warm-up save of each (buffers are allocated)
        for name in (("durable", "memory") if i % 2 == 0 else ("memory", "durable")):
            save, checkpointer = tiers[name]
            plain.append(run(5))
            started = time.perf_counter()
            save(step)
            call = time.perf_counter() - started
            fenced = checkpointer.fence_seconds
            run(1)  # its optimizer step waits for the background copy
            stall = call + checkpointer.fence_seconds - fenced
            checkpointer.wait()  # the write finishes before anything else is measured
            dist.barrier()
            if i >= 0:
                stalls[name].append(stall)
                writes[name].append(checkpointer.last_save_seconds)  # writer ranks only
    step_s = statistics.median(plain)
    mine = {"step_s": step_s, **{f"{k}_stall_s": v for k, v in stalls.items()},
            **{f"{k}_write_s": v for k, v in writes.items()}}
    every = dist.all_gather_objects(mine)
    manager.close()
    if dist.rank() == 0:  # the slowest rank sets the pace of a synchronous job
        result: dict[str, Any] = {"step_s": max(r["step_s"] for r in every)}
        for key in (f"{k}_{v}_s" for k in tiers for v in ("stall", "write")):
            result[key] = [max(r[key][i] for r in every) for i in range(args["saves"])]
            result[key[:-2] + "_median_s"] = statistics.median(result[key])
        _write_json(os.path.join(out, "calibrate.json"), result)


def train(args: dict[str, Any], out: str) -> None:
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    memory = args["memory_every"] or None
    loop = Loop(args, save_every_steps=args["durable_every"], memory_every_steps=memory,
                memory_dir=args["memory_dir"])
    resumed = loop.manager.resume()
    if restart:
        if dist.rank() == 0:
            _write_json(os.path.join(out, f"resume-{restart}.json"),
                        {"step": resumed.step, "source": resumed.source})
        dist.barrier()
        loop.manager.close()
        return
    with open(os.path.join(out, f"pid-{dist.rank()}"), "w") as fh:
        fh.write(str(os.getpid()))
    log = open(os.path.join(out, f"steps-{restart}.log"), "w") if dist.rank() == 0 else None
    for step in range(resumed.step, args["max_steps"]):
        loop.step(step)
        if log is not None:
            log.write(f"{step + 1} {time.perf_counter():.6f}\n")
            log.flush()
        loop.manager.step_done(step + 1)
    loop.manager.close()  # only reached if nobody killed the job


def _write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(value, fh)
    os.replace(path + ".tmp", path)


def main() -> int:
    mode, raw, out = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.setup(300.0)
    try:
        {"calibrate": calibrate, "train": train}[mode](json.loads(raw), out)
    finally:
        dist.teardown(graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
