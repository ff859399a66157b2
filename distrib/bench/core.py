"""What every figure shares: the result record, paired timing, the environment, the tables.

A figure is a ratio of two things measured in the same run, interleaved: each repetition times
both sides back to back (alternating which goes first) and yields one ratio; the figure is the
median of those ratios, with their min and max. Absolute times drift several-fold on a shared
machine, the ratio of neighbouring measurements much less.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

MB = 1 << 20

#: the title and goal of each figure, and the goal it is held against
GOALS: dict[int, tuple[str, str, float]] = {
    1: ("sync save / raw fsync'd write, throughput", ">=", 0.90),
    2: ("sync save / torch.save + fsync, throughput", ">=", 1.0),
    3: ("async save training-thread stall / sync save time", "<=", 0.05),
    4: ("training throughput, async checkpoints / none", ">=", 0.95),
    5: ("distrib step time / hand-written DDP loop step time", "<=", 1.02),
    6: ("relaunch to first step, resuming / fresh start + raw read", "<=", 1.2),
    7: ("S3 checkpoint upload / s3fs put_file, throughput", ">=", 0.9),
    8: ("save time vs size: fitted exponent", "<=", 1.1),
    9: ("early-stop + preemption agreement time / epoch time", "<=", 0.01),
    10: ("steps replayed per worker SIGKILL at <= 1% stall: memory tier / durable", "<=", 0.1),
    11: ("relaunch to first step, resuming from memory / fresh start", "<=", 1.1),
    12: ("node replaced, relaunch to first step: state from peer / from storage", "<=", 1.0),
    13: ("sync save / torch.distributed.checkpoint save, speed", ">=", 1.0),
    14: ("async save stall: dcp.async_save's / distrib's", ">=", 1.0),
    15: ("load into live objects / dcp.load in place, speed", ">=", 1.0),
    16: ("memory-tier snapshot time vs size: fitted exponent", "<=", 1.1),
}


@dataclass
class Settings:
    """What the command line chose."""

    workdir: str  # scratch directory on the storage under test
    size_mb: float  # the training state of figures 1, 2, 3 and 6; figure 8 scales around it
    reps: int
    quick: bool


@dataclass
class Figure:
    """One measured figure: per-repetition ratios against a goal."""

    number: int
    title: str
    goal_op: str  # ">=" or "<="
    goal: float
    ratios: list[float]
    sizes: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # why the figure is not valid (e.g. losses differ); empty when it is

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def passed(self) -> bool:
        if self.problem or not self.ratios:
            return False
        return self.median >= self.goal if self.goal_op == ">=" else self.median <= self.goal

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ratio=self.median, median=self.median, min=min(self.ratios, default=math.nan),
                   max=max(self.ratios, default=math.nan), goal=f"{self.goal_op} {self.goal}",
                   goal_value=self.goal, **{"pass": self.passed})
        return out


def figure(number: int, ratios: list[float], sizes: dict[str, Any] | None = None,
           details: dict[str, Any] | None = None, note: str = "", problem: str = "") -> Figure:
    """Figure ``number`` with its title (plus ``note``) and goal from :data:`GOALS`."""
    title, op, goal = GOALS[number]
    return Figure(number, f"{title} ({note})" if note else title, op, goal, ratios, sizes or {},
                  details or {}, problem)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(reps: int, sides: Sequence[Callable[[], float]],
               between: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Run every side once per repetition, rotating which goes first; ``result[s][r]`` is what
    side ``s`` returned in repetition ``r`` (each side measures itself and returns seconds).
    ``between`` runs after every side, untimed (clean-up)."""
    out: list[list[float]] = [[] for _ in sides]
    for rep in range(reps):
        for k in range(len(sides)):
            s = (rep + k) % len(sides)
            out[s].append(sides[s]())
            between()
    return out


def fitted_exponents(nbytes: Sequence[int], columns: Sequence[Sequence[float]], reps: int
                     ) -> list[float]:
    """Per repetition, the least-squares slope of log(time) against log(size): ``columns[i][r]``
    is repetition ``r``'s time at size ``nbytes[i]``."""
    xs = [math.log(n) for n in nbytes]
    mx = sum(xs) / len(xs)
    out = []
    for rep in range(reps):
        ys = [math.log(column[rep]) for column in columns]
        my = sum(ys) / len(ys)
        out.append(sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                   / sum((x - mx) ** 2 for x in xs))
    return out


def fsync_write(path: str, data: memoryview) -> None:
    """The raw baseline: write ``data`` to a new file and fsync it, nothing else."""
    with open(path, "wb", buffering=0) as fh:
        view = data
        while view:
            view = view[fh.write(view):]
        os.fsync(fh.fileno())


def filesystem_of(path: str) -> str:
    """The mount type and device holding ``path`` (from /proc/mounts; "unknown" elsewhere)."""
    path = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                device, mount, fstype = line.split()[:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) >= len(best[0]):
                    best = (mount, fstype, device)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


def environment(settings: Settings) -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "storage_path": settings.workdir,
            "storage": filesystem_of(settings.workdir),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "reps": settings.reps, "quick": settings.quick}


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def table_rows(figures: Sequence[Figure]) -> list[list[str]]:
    rows = []
    for f in figures:
        lo, hi = min(f.ratios, default=math.nan), max(f.ratios, default=math.nan)
        verdict = "PASS" if f.passed else "MISS" + (f" ({f.problem})" if f.problem else "")
        rows.append([str(f.number), f.title, _fmt(f.median), _fmt(lo), _fmt(hi),
                     f"{f.goal_op} {f.goal:g}", verdict])
    return rows


HEADER = ["#", "figure", "ratio", "min", "max", "goal", "result"]


def text_table(figures: Sequence[Figure]) -> str:
    rows = [HEADER, *table_rows(figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(figures: Sequence[Figure]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(figures)]
    return "\n".join(lines)
