"""Early stopping as a pure state machine (no torch, no torch.distributed).

Decisions follow PyTorch Lightning's ``EarlyStopping._evaluate_stopping_criteria`` for the options it
has, checked in this order on every :meth:`EarlyStopping.update`:

1. ``check_finite`` and the value is NaN or infinite -> stop;
2. ``stopping_threshold`` is set and the value is strictly better than it -> stop;
3. ``divergence_threshold`` is set and the value is strictly worse than it -> stop;
4. ``value - delta`` is strictly better than the best so far -> improvement: best = value, counter
   reset (``delta`` is ``+min_delta`` for mode max and ``-min_delta`` for mode min, so an
   improvement must beat the best by *more* than ``min_delta``; the first finite value always
   improves on the initial +/-inf);
5. otherwise the counter grows by one, and reaching ``patience`` stops.

Thresholds (1-3) never update the best value. As in Lightning, ``update`` evaluates again if it is
called after a stop; :attr:`stopped` records that a stop happened at least once. Lightning compares
float32 tensors; this class compares Python floats (float64), which agree except for values that
differ only beyond float32 precision.

Beyond Lightning, from Keras: ``baseline`` (an improvement resets the counter only if it also beats
the baseline, so a run that never beats the baseline stops after ``patience`` evaluations),
``start_from_epoch`` (evaluations of earlier epochs are ignored) and ``restore_best_weights`` (a
flag for the trainer, which keeps the weights of :attr:`best_epoch`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

#: why early stopping stopped (or that it has not)
Reason = Literal["not_stopped", "non_finite", "stopping_threshold", "divergence_threshold",
                 "patience_exhausted"]
REASONS: tuple[str, ...] = get_args(Reason)


class EarlyStopping:
    """Decide when to stop from a sequence of monitored values; see the module docstring.

    Args:
        monitor: name of the monitored metric (used in messages and checked on load).
        mode: ``"min"`` if lower is better, ``"max"`` if higher is better.
        patience: evaluations without improvement before stopping.
        min_delta: an improvement must beat the best by more than this.
        stopping_threshold: stop as soon as the value is better than this.
        divergence_threshold: stop as soon as the value is worse than this.
        check_finite: stop when the value is NaN or infinite.
        baseline: improvements reset the counter only once they beat this value.
        start_from_epoch: ignore the evaluations of the first this-many epochs (0-based index
            below it), as Keras does.
        restore_best_weights: ask the trainer to end with the best epoch's weights.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None, check_finite: bool = True,
                 baseline: float | None = None, start_from_epoch: int = 0,
                 restore_best_weights: bool = False) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if start_from_epoch < 0:
            raise ValueError(f"start_from_epoch must be >= 0, got {start_from_epoch}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = check_finite
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = restore_best_weights
        # Lightning: min_delta *= 1 if mode == "max" else -1, then compare (current - min_delta).
        self._delta = self.min_delta if mode == "max" else -self.min_delta
        self.best: float = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait_count = 0
        self.updates = 0
        self.improved = False
        self.stopped = False
        self.stopped_epoch: int | None = None
        self.reason: str | None = None
        self.reason_code: Reason = "not_stopped"

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def update(self, value: float, epoch: int | None = None) -> bool:
        """Feed one evaluation's monitored value; return True if training should stop now.

        ``epoch`` is the 0-based index of the evaluated epoch (for ``start_from_epoch`` and
        :attr:`best_epoch`); by default evaluations are numbered 0, 1, 2, ... in call order.
        Messages number epochs from 1, as training logs do.
        """
        epoch = self.updates if epoch is None else epoch
        self.updates += 1
        self.improved = False
        if epoch < self.start_from_epoch:
            return False
        current = float(value)
        sign = "<" if self.mode == "min" else ">"
        worse = ">" if self.mode == "min" else "<"
        if self.check_finite and not math.isfinite(current):
            return self._stop("non_finite", epoch,
                              f"{self.monitor} = {current} is not finite; previous best "
                              f"{self._best_text()}")
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return self._stop("stopping_threshold", epoch,
                              f"stopping threshold reached: {self.monitor} = {current:.6g} {sign} "
                              f"{self.stopping_threshold}")
        if (self.divergence_threshold is not None
                and self._better(-current, -self.divergence_threshold)):
            return self._stop("divergence_threshold", epoch,
                              f"divergence threshold crossed: {self.monitor} = {current:.6g} "
                              f"{worse} {self.divergence_threshold}")
        if self._better(current - self._delta, self.best):
            self.best, self.best_epoch, self.improved = current, epoch, True
            if self.baseline is None or self._better(current - self._delta, self.baseline):
                self.wait_count = 0
                return False
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return self._stop("patience_exhausted", epoch,
                              f"{self.monitor} did not improve in the last {self.wait_count} "
                              f"evaluations; best {self._best_text()}")
        return False

    def _best_text(self) -> str:
        if self.best_epoch is None:
            return "none yet"
        return f"{self.best:.6g} at epoch {self.best_epoch + 1}"

    def _stop(self, code: Reason, epoch: int, message: str) -> bool:
        self.stopped = True
        self.stopped_epoch = epoch
        self.reason_code = code
        self.reason = f"early stop after epoch {epoch + 1}: {message}"
        return True

    def state_dict(self) -> dict[str, Any]:
        """The mutable state (JSON-able apart from +/-inf and NaN floats)."""
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best,
                "best_epoch": self.best_epoch, "wait_count": self.wait_count,
                "updates": self.updates, "stopped": self.stopped,
                "stopped_epoch": self.stopped_epoch, "reason": self.reason,
                "reason_code": self.reason_code}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the options come from the constructor, not the state.

        Raises ValueError (one line) if the state is malformed or monitored another metric or
        direction; nothing is changed then.
        """
        self.check_state_dict(state)
        self.best = float(state["best"])
        self.best_epoch = state["best_epoch"]
        self.wait_count = int(state["wait_count"])
        self.updates = int(state["updates"])
        self.stopped = bool(state["stopped"])
        self.stopped_epoch = state["stopped_epoch"]
        self.reason = state["reason"]
        self.reason_code = state["reason_code"]
        self.improved = False

    def check_state_dict(self, state: Any) -> None:
        """ValueError unless ``state`` is a well-formed :meth:`state_dict` for this monitor."""
        if not isinstance(state, dict):
            raise ValueError(f"early-stopping state must be a mapping, not {type(state).__name__}")
        kinds: dict[str, tuple[type, ...]] = {
            "monitor": (str,), "mode": (str,), "best": (float, int), "best_epoch": (int, type(None)),
            "wait_count": (int,), "updates": (int,), "stopped": (bool,),
            "stopped_epoch": (int, type(None)), "reason": (str, type(None)),
            "reason_code": (str,)}
        for key, kind in kinds.items():
            value = state.get(key, ...)
            if value is ... or (isinstance(value, bool) and bool not in kind) \
                    or not isinstance(value, kind):
                raise ValueError(f"early-stopping state: {key!r} is missing or of the wrong type")
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"early-stopping state: {key!r} is negative")
        if state["monitor"] != self.monitor or state["mode"] != self.mode:
            raise ValueError(f"early-stopping state monitors {state['monitor']} ({state['mode']}), "
                             f"this run monitors {self.monitor} ({self.mode})")
        if state["reason_code"] not in REASONS:
            raise ValueError(f"early-stopping state: unknown reason {state['reason_code']!r}")
