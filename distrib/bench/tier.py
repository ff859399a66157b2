"""Figure 10: steps replayed after a worker SIGKILL, memory tier against durable-only saving, each
at the interval whose training-thread overhead is at most 1% of the step time.

One calibration job (:mod:`distrib.bench.replay` ``calibrate``, 2 ranks of the bench ``mlp``)
measures the step time with no checkpoints and the per-save stall of a durable asynchronous save
and of a memory snapshot; each tier's interval is the smallest N with stall / (N x step time)
<= 1%, and at least its write's duration (a save that has to wait for the previous one stalls
longer). Then, per repetition and side (interleaved), a 2-rank job (``train``, torchrun
``--max-restarts 1``) trains with that tier alone; after a few intervals, at a random phase of
the next one (the same phase for both sides of a repetition), rank 1 gets a SIGKILL. torchrun
restarts the group, which records the step it resumed from. Replayed steps = the last step rank
0 completed before the kill - the step resumed from; the figure is, per repetition, memory's
count / durable's (durable's taken as at least 1).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import statistics
import time
import uuid
from typing import Any

from distrib.bench.core import Figure, Settings, figure, interleave
from distrib.bench.jobs import MODEL, torchrun
from distrib.bench.spawn import Job, memory_root, restart_env, wait_for

OVERHEAD = 0.01  # the stall budget: 1% of the step time


def _steps(path: str) -> list[tuple[int, float]]:
    """The complete ``STEP SECONDS`` lines of a step log."""
    try:
        with open(path) as fh:
            raw = fh.read()
    except OSError:
        return []
    lines = raw.split("\n")[:-1]  # the last piece has no newline yet
    return [(int(a), float(b)) for a, b in (line.split() for line in lines)]


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return None


def calibrate(settings: Settings, root: str, shm: str) -> dict[str, Any]:
    out = os.path.join(root, "calibrate")
    os.makedirs(out)
    args = {**MODEL, "samples": 4096, "ckpt": os.path.join(out, "ck"), "memory_dir": shm,
            "plain_steps": 20 if settings.quick else 40, "saves": 4 if settings.quick else 8}
    job = Job(torchrun("-m", "distrib.bench.replay", "calibrate", json.dumps(args), out),
              os.path.join(out, "job.log"))
    try:
        if job.proc.wait(600) != 0:
            raise job.fail("the calibration job failed")
    finally:
        job.kill()
    result = _read_json(os.path.join(out, "calibrate.json"))
    if result is None:
        raise job.fail("the calibration job wrote no result")
    shutil.rmtree(out, ignore_errors=True)
    return result


def interval(stall_s: float, write_s: float, step_s: float) -> int:
    """The smallest N with stall / (N x step) <= 1% whose interval also outlasts the background
    write (else the next save waits for it, and that wait is a stall too)."""
    return max(1, math.ceil(stall_s / (OVERHEAD * step_s) - 1e-9), math.ceil(write_s / step_s))


def kill_run(root: str, shm: str, name: str, durable: int, memory: int, phase: float,
             intervals: int, step_s: float) -> dict[str, Any]:
    """One job of one tier, one worker SIGKILL at ``phase`` of interval ``intervals + 1``: the
    steps replayed and what it resumed from."""
    out, shm = os.path.join(root, name), os.path.join(shm, name)
    os.makedirs(out)
    os.makedirs(shm)
    every = durable or memory
    args = {**MODEL, "samples": 4096, "ckpt": os.path.join(out, "ck"), "memory_dir": shm,
            "durable_every": durable, "memory_every": memory, "max_steps": 10**7}
    env = restart_env(DISTRIB_RUN_ID=f"bench-replay-{uuid.uuid4().hex[:8]}")
    steps_log = os.path.join(out, "steps-0.log")
    job = Job(torchrun("--max-restarts=1", "-m", "distrib.bench.replay", "train",
                       json.dumps(args), out),
              os.path.join(out, "job.log"), env)
    try:
        start = intervals * every
        wait_for(lambda: (_steps(steps_log) or [(0, 0.0)])[-1][0] >= start, job, 300,
                 f"waiting for step {start}")
        time.sleep(phase * every * step_s)
        with open(os.path.join(out, "pid-1")) as fh:
            os.kill(int(fh.read()), signal.SIGKILL)
        resume_file = os.path.join(out, "resume-1.json")
        wait_for(lambda: os.path.exists(resume_file), job, 300, "waiting for the relaunch")
        resumed = _read_json(resume_file)
        assert resumed is not None
        steps = _steps(steps_log)  # final: the first group's rank 0 is gone
        job.proc.wait(60)
    finally:
        job.kill()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    gaps = [b - a for (_, a), (_, b) in zip(steps[5:], steps[6:])]
    return {"last_step": steps[-1][0], "resumed_step": int(resumed["step"]),
            "source": resumed["source"], "replayed": steps[-1][0] - int(resumed["step"]),
            "step_s": statistics.fmean(gaps) if gaps else math.nan}


def figure_10(settings: Settings) -> Figure:
    """Steps replayed per worker SIGKILL: memory tier / durable-only, both at <= 1% stall."""
    root = os.path.join(settings.workdir, "replay")
    os.makedirs(root, exist_ok=True)
    shm = memory_root(settings)
    try:
        cal = calibrate(settings, root, shm)
        step_s = cal["step_s"]
        every = {k: interval(cal[f"{k}_stall_median_s"], cal[f"{k}_write_median_s"], step_s)
                 for k in ("durable", "memory")}
        intervals = 2 if settings.quick else 3
        rng = random.Random(10)
        phases = [rng.random() for _ in range(settings.reps)]
        runs: dict[str, list[dict[str, Any]]] = {"durable": [], "memory": []}

        def side(name: str) -> float:
            rep = len(runs[name])
            runs[name].append(kill_run(
                root, shm, f"{name}-{rep}", every[name] if name == "durable" else 0,
                every[name] if name == "memory" else 0, phases[rep], intervals, step_s))
            return float(runs[name][-1]["replayed"])

        memory, durable = interleave(settings.reps, [lambda: side("memory"),
                                                     lambda: side("durable")])
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    right = all(str(r["source"]).startswith("memory:") for r in runs["memory"]) and \
        all(r["source"] and not str(r["source"]).startswith("memory:") for r in runs["durable"])
    details = {"step_s": step_s, **{f"{k}_{v}_s": cal[f"{k}_{v}_s"] for k in runs
                                    for v in ("stall", "write")}, "phases": phases,
               "memory_replayed": memory, "durable_replayed": durable,
               **{f"{k}_{v}": [r[v] for r in runs[k]] for k in runs
                  for v in ("last_step", "resumed_step", "source", "step_s")}}
    note = (f"replayed {statistics.median(memory):.0f} vs {statistics.median(durable):.0f}; "
            f"every {every['memory']} vs {every['durable']} steps for stalls of "
            f"{cal['memory_stall_median_s'] * 1e3:.0f} vs "
            f"{cal['durable_stall_median_s'] * 1e3:.0f} ms, step {step_s * 1e3:.0f} ms")
    return figure(10, [m / max(d, 1.0) for m, d in zip(memory, durable)],
                  {**MODEL, "ranks": 2, "memory_every_steps": every["memory"],
                   "durable_every_steps": every["durable"], "intervals_before_kill": intervals},
                  details, note, "" if right else "a relaunch did not resume from its tier")
