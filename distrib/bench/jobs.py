"""Figures 4, 5, 6 and 9: real 2-rank gloo jobs under torchrun.

Figures 4, 5 and 9 run :mod:`distrib.bench.worker` (both sides of each comparison inside one
job, so they share the process group and the machine's state); figure 6 relaunches
``python -m distrib.train`` itself and times how long the first optimizer step takes to arrive.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import distrib
from distrib.bench.core import MB, Figure, Settings, figure, interleave
from distrib.bench.tasks import state_args

RANKS = 2
FIRST_STEP = "first optimizer step done"


def job_env() -> dict[str, str]:
    """The environment of a benchmark job: one thread per rank, this copy of distrib importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(distrib.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launcher(*args: str) -> list[str]:
    """``torchrun ARGS`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *args]


def torchrun(*args: str) -> list[str]:
    """A one-node job of :data:`RANKS` ranks."""
    return launcher("--standalone", f"--nproc_per_node={RANKS}", *args)


def run_worker(settings: Settings, scenario: str, args: dict[str, Any],
               timeout: float = 900) -> dict[str, Any]:
    out = os.path.join(settings.workdir, f"{scenario}.json")
    args = {**args, "reps": settings.reps, "dir": os.path.join(settings.workdir, scenario)}
    proc = subprocess.run(torchrun("-m", "distrib.bench.worker", scenario, json.dumps(args), out),
                          env=job_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"benchmark job {scenario!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-8000:]}")
    with open(out) as fh:
        return dict(json.load(fh))


#: the model of figures 4, 5 and 9 (``distrib.bench.tasks:mlp``): a step of some 30-60 ms on 2
#: ranks of one core each, 2.4 M parameters (a 29 MB checkpoint with AdamW's state)
MODEL = {"features": 256, "hidden": 1024, "depth": 2, "batch": 32}


def figure_4(settings: Settings) -> Figure:
    r = run_worker(settings, "ckpt", {**MODEL, "val": 0, "saves": 2 if settings.quick
                                      else 4})
    return figure(4, [p / c for p, c in zip(r["plain_step_s"], r["ckpt_step_s"])],
                  {"every_k_steps": r["every_k"], "steps": r["steps"]}, r,
                  f"a checkpoint every {r['every_k']} steps")


def figures_5_9(settings: Settings) -> list[Figure]:
    model = MODEL
    steps_per_epoch, epochs = (15, 2) if settings.quick else (40, 3)
    r = run_worker(settings, "steps", {**model, "epochs": epochs, "val": 256,
                                       "samples": steps_per_epoch * model["batch"] * RANKS})
    equal = all(d < 0.5e-5 for d in r["max_loss_diff"])
    sizes = {**model, "ranks": RANKS, "steps_per_epoch": steps_per_epoch, "epochs": epochs}
    f5 = figure(5, [d / h for d, h in zip(r["distrib_step_s"], r["hand_step_s"])], sizes,
                {**r, "losses_equal_to_5_decimals": equal},
                problem="" if equal else "losses differ")
    f9 = figure(9, [(a + d) / e for a, d, e in zip(r["agree_s"], r["decide_s"], r["epochs_s"])],
                sizes, {k: r[k] for k in ("agree_s", "decide_s", "epochs_s")})
    return [f5, f9]


class Launch:
    """``torchrun ... -m distrib.train ARGS``, timed from launch until rank 0 logs its first
    optimizer step; then the job is killed (nothing after the first step is of interest).
    ``lines``: its output up to that step."""

    def __init__(self, args: list[str], timeout: float = 300,
                 env: dict[str, str] | None = None) -> None:
        started = time.perf_counter()
        proc = subprocess.Popen(torchrun("-m", "distrib.train", *args), env=env or job_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=self._pump, args=(proc, lines), daemon=True)
        reader.start()
        self.lines: list[str] = []
        self.seconds = math.nan
        try:
            while True:
                line = lines.get(timeout=max(1.0, timeout - (time.perf_counter() - started)))
                if line is None:
                    break
                self.lines.append(line)
                if FIRST_STEP in line:
                    self.seconds = time.perf_counter() - started
                    break
        finally:
            _kill_job(proc)
            reader.join(10)
        if math.isnan(self.seconds):
            raise RuntimeError("the training job never reached its first step:\n"
                               + "".join(self.lines[-40:]))

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _kill_job(proc: subprocess.Popen[str]) -> None:
    """SIGKILL torchrun and its workers (which torchrun starts in sessions of their own), and
    wait until they are gone, so that nothing writes into the scratch folder afterwards."""
    pids = [proc.pid, *(c for w in _children(proc.pid) for c in (w, *_children(w)))]
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                              _state(p) != "Z" for p in pids[1:]):
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def raw_read(paths: list[str]) -> None:
    """The baseline of figure 6: read the checkpoint's bytes with plain reads into memory."""
    buffer = bytearray(max(os.path.getsize(p) for p in paths))
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def relaunch_args(settings: Settings) -> list[str]:
    """``distrib.train`` flags of the relaunched jobs (figures 6, 11 and 12): the bench ``mlp``
    whose parameters plus Adam state hold >= ``size_mb``, no periodic checkpoints."""
    return ["--task", "distrib.bench.tasks:mlp", *state_args(int(settings.size_mb * MB)),
            "--batch-size", "4", "--optimizer", "adam", "--no-progress", "--max-epochs", "1",
            "--save-every-epochs", "0", "--task-arg", "val=16", "--no-early-stop"]
    # (the default --monitor-metric val_loss is used, hence the small validation set)


def figure_6(settings: Settings) -> Figure:
    """Relaunch and resume a checkpoint of >= size_mb vs a fresh start plus a raw read."""
    root = os.path.join(settings.workdir, "relaunch")
    common = relaunch_args(settings)
    resumed = os.path.join(root, "resume")
    os.makedirs(root, exist_ok=True)
    from distrib.bench.spawn import prepared_checkpoint  # (spawn builds on this module)

    _, info = prepared_checkpoint(common, resumed, os.path.join(root, "prepare.log"),
                                  timeout=600)
    assert info.manifest is not None
    files = [os.path.join(resumed, info.name, f.name) for f in info.manifest.files]
    fresh_runs = [0]

    def resume() -> float:
        return Launch([*common, "--checkpoint-dir", resumed]).seconds

    def fresh() -> float:
        fresh_runs[0] += 1
        where = os.path.join(root, f"fresh-{fresh_runs[0]}")
        seconds = Launch([*common, "--checkpoint-dir", where]).seconds
        started = time.perf_counter()
        raw_read(files)
        return seconds + (time.perf_counter() - started)

    resumes, fresh_plus_read = interleave(settings.reps, [resume, fresh])
    return figure(6, [r / f for r, f in zip(resumes, fresh_plus_read)],
                  {"checkpoint_mb": round(info.size / MB, 1)},
                  {"resume_s": resumes, "fresh_plus_read_s": fresh_plus_read},
                  f"{info.size / MB:.0f} MB")
