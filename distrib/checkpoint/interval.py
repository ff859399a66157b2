"""``auto`` checkpoint intervals: Young/Daly on smoothed measurements, with hysteresis.

The interval that minimises expected lost work plus checkpoint overhead is
``sqrt(2 x cost x MTBF)`` (Young 1974, Daly 2006), where the cost is what one checkpoint takes
from training (the training thread's stall) and MTBF the mean time between failures. Both tiers
use :class:`AutoInterval`: the memory tier from every rank's snapshot stall (all-gathered), the
durable tier from rank 0's save stall (broadcast). Measurements are smoothed (an exponential
moving average) and the interval moves only when the new choice differs by a quarter or more,
so that noisy step times neither make it oscillate nor fill the log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: the weight of a new measurement in the moving averages
SMOOTHING = 0.3
#: the interval changes only when the new choice differs from it by this fraction or more
HYSTERESIS = 0.25


def young_daly_steps(save_seconds: float, step_seconds: float, mtbf_seconds: float,
                     most: int = 10**6) -> int:
    """The checkpoint interval, in steps, that minimises expected lost work plus checkpoint
    overhead: Young/Daly, ``sqrt(2 x save cost x mean time between failures)``."""
    if step_seconds <= 0 or not math.isfinite(step_seconds):
        return 1
    seconds = math.sqrt(2.0 * max(save_seconds, 0.0) * max(mtbf_seconds, 0.0))
    return max(1, min(most, round(seconds / step_seconds)))


@dataclass
class AutoInterval:
    """An ``auto`` interval (see the module docstring). Deterministic: the same measurements
    give the same interval on every rank that feeds it.

    ``what`` names the checkpoints in the log line (e.g. ``"checkpoint"``); ``interval`` is the
    one in force until the first measurement."""

    what: str
    interval: int
    mtbf_seconds: float
    stall: float | None = None
    step_seconds: float | None = None
    write_seconds: float = 0.0
    clock: tuple[float, int] | None = None  # (time, step) of the last checkpoint

    def tick(self, now: float, step: int) -> float:
        """Seconds per step since the last tick (0.0 at the first, or without progress); the
        clock restarts at ``(now, step)``."""
        then, self.clock = self.clock, (now, step)
        return (now - then[0]) / (step - then[1]) if then and step > then[1] else 0.0

    def update(self, stall: float, step_seconds: float, write_seconds: float = 0.0,
               announce: bool = True) -> int:
        """Take one measurement (the stall of the last checkpoint, seconds per step since the
        one before, and the last write's duration: the interval never lets writes queue up, it
        is at least 1.5 writes' time) and return the interval now. ``announce``: log a change
        (INFO, with the numbers behind it)."""
        if step_seconds <= 0 or not math.isfinite(step_seconds) or stall < 0:
            return self.interval
        self.stall = _smooth(self.stall, stall)
        self.step_seconds = _smooth(self.step_seconds, step_seconds)
        self.write_seconds = _smooth(self.write_seconds or None, write_seconds)
        chosen = max(young_daly_steps(self.stall, self.step_seconds, self.mtbf_seconds),
                     math.ceil(1.5 * self.write_seconds / self.step_seconds))
        if abs(chosen - self.interval) >= max(1.0, HYSTERESIS * self.interval):
            if announce:
                log.info("%s every %d steps (auto: stall %.3fs, write %.2fs, %.3fs per step, "
                         "expected time between failures %.0fs)", self.what, chosen, self.stall,
                         self.write_seconds, self.step_seconds, self.mtbf_seconds)
            self.interval = chosen
        return self.interval


def _smooth(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value


__all__ = ["AutoInterval", "young_daly_steps"]
