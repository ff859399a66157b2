"""The early-stopping state machine: Lightning's decisions, Keras' extras, state round trip."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distrib.training.early_stopping import EarlyStopping

NAN, INF = math.nan, math.inf
F, T = False, True

# (options, monitored values, expected decision after each value, final reason code)
# Derived from Lightning's EarlyStopping._evaluate_stopping_criteria; values are binary fractions
# so that float32 (Lightning) and float64 (here) agree exactly, including at equality.
TABLE: list[tuple[dict[str, Any], list[float], list[bool], str]] = [
    # equality with the best is not an improvement; patience counts evaluations
    ({"patience": 3}, [1.0, 0.5, 0.5, 0.5, 0.5], [F, F, F, F, T], "patience_exhausted"),
    # improvements are measured against the best, not the previous value
    ({"patience": 2}, [1.0, 1.5, 0.75, 1.25, 1.0], [F, F, F, F, T], "patience_exhausted"),
    # min mode: must beat best by MORE than min_delta (0.75 + 0.25 == 1.0 is not < 1.0)
    ({"patience": 2, "min_delta": 0.25}, [1.0, 0.75, 0.5, 0.5], [F, F, F, F],
     "not_stopped"),
    ({"patience": 2, "min_delta": 0.25}, [1.0, 0.75, 0.875], [F, F, T], "patience_exhausted"),
    # max mode: min_delta applies in the other direction (1.25 - 0.25 == 1.0 is not > 1.0)
    ({"mode": "max", "patience": 1, "min_delta": 0.25}, [1.0, 1.25], [F, T],
     "patience_exhausted"),
    ({"mode": "max", "patience": 1, "min_delta": 0.25}, [1.0, 1.5, 1.5], [F, F, T],
     "patience_exhausted"),
    # the first finite value always improves on the initial +/-inf
    ({"patience": 0}, [1e30], [F], "not_stopped"),
    ({"mode": "max", "patience": 0}, [-1e30], [F], "not_stopped"),
    # patience 0: the first non-improvement stops
    ({"patience": 0}, [1.0, 1.0], [F, T], "patience_exhausted"),
    # stopping threshold: strictly better than it stops at once, and does not become the best
    ({"stopping_threshold": 0.5}, [1.0, 0.5, 0.25], [F, F, T], "stopping_threshold"),
    ({"mode": "max", "stopping_threshold": 0.5}, [0.25, 0.5, 0.75], [F, F, T],
     "stopping_threshold"),
    # divergence threshold: strictly worse than it stops at once
    ({"divergence_threshold": 2.0}, [1.0, 2.0, 2.5], [F, F, T], "divergence_threshold"),
    ({"mode": "max", "divergence_threshold": 0.5}, [1.0, 0.5, 0.25], [F, F, T],
     "divergence_threshold"),
    # non-finite values stop at once when checked, before any threshold
    ({}, [NAN], [T], "non_finite"),
    ({"stopping_threshold": 0.25}, [1.0, INF], [F, T], "non_finite"),
    ({"mode": "max"}, [1.0, -INF], [F, T], "non_finite"),
    # unchecked: NaN never improves; -inf improves in min mode and then nothing beats it
    ({"check_finite": False, "patience": 2}, [1.0, NAN, NAN], [F, F, T], "patience_exhausted"),
    ({"check_finite": False, "patience": 1}, [1.0, -INF, 0.0], [F, F, T], "patience_exhausted"),
    # stopping threshold is checked before divergence
    ({"stopping_threshold": 5.0, "divergence_threshold": 1.0}, [3.0], [T], "stopping_threshold"),
    # like Lightning, evaluation continues after a stop (an improvement says "go on")
    ({"patience": 1}, [1.0, 1.0, 0.5], [F, T, F], "patience_exhausted"),
    # Keras extras: improvements that do not beat the baseline still count toward patience
    ({"baseline": 0.5, "patience": 2}, [1.0, 0.75, 0.25, 0.5], [F, T, F, F],
     "patience_exhausted"),
    # the first start_from_epoch evaluations are ignored entirely
    ({"start_from_epoch": 2, "patience": 0}, [NAN, 5.0, 1.0, 1.0], [F, F, F, T],
     "patience_exhausted"),
]


@pytest.mark.parametrize("options, values, expected, reason", TABLE)
def test_decision_table(options: dict[str, Any], values: list[float], expected: list[bool],
                        reason: str) -> None:
    es = EarlyStopping(**options)
    assert [es.update(v) for v in values] == expected
    assert es.reason_code == reason
    assert es.stopped == (reason != "not_stopped")
    if es.stopped:
        assert es.reason and es.reason.startswith("early stop after epoch")


def test_best_and_best_epoch_follow_improvements_only() -> None:
    es = EarlyStopping(patience=5, stopping_threshold=0.1)
    for epoch, value in enumerate([1.0, 0.5, 0.75, 0.25, 0.0625]):
        es.update(value, epoch=epoch)
    assert es.best == 0.25 and es.best_epoch == 3  # the threshold value did not become best
    assert es.reason_code == "stopping_threshold"


def test_state_round_trip_resumes_the_counter() -> None:
    values = [1.0, 0.5, 0.75, 0.625, 0.875, 0.5]
    straight = EarlyStopping(patience=3)
    decisions = [straight.update(v) for v in values]
    first = EarlyStopping(patience=3)
    for v in values[:4]:
        first.update(v)
    assert first.wait_count == 2
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON (inf included? no: finite)
    second = EarlyStopping(patience=3)
    second.load_state_dict(state)
    assert decisions[4:] == [second.update(v) for v in values[4:]]
    assert second.state_dict() == straight.state_dict()


def test_state_with_infinite_best_round_trips_through_checkpoint_codec() -> None:
    from distrib.checkpoint.serialization import flatten_state, unflatten_state

    es = EarlyStopping(mode="max")
    skeleton, tensors = flatten_state(es.state_dict())
    restored = EarlyStopping(mode="max")
    restored.load_state_dict(unflatten_state(json.loads(json.dumps(skeleton)), tensors))
    assert restored.best == -math.inf


def test_load_refuses_another_monitor() -> None:
    with pytest.raises(ValueError, match="monitors val_loss"):
        EarlyStopping(monitor="val_acc", mode="max").load_state_dict(EarlyStopping().state_dict())


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError):
        EarlyStopping(patience=-1)


# --------------------------------------------------------------------- against Lightning itself

GRID = [i / 4 for i in range(-8, 9)]
VALUES = st.one_of(st.sampled_from(GRID), st.sampled_from([NAN, INF, -INF]))


@given(mode=st.sampled_from(["min", "max"]), patience=st.integers(0, 3),
       min_delta=st.sampled_from([0.0, 0.25, 0.5]),
       stopping=st.one_of(st.none(), st.sampled_from(GRID)),
       divergence=st.one_of(st.none(), st.sampled_from(GRID)),
       check_finite=st.booleans(), values=st.lists(VALUES, min_size=1, max_size=12))
@settings(max_examples=400, deadline=None)
def test_identical_to_lightning(mode: str, patience: int, min_delta: float, stopping: float | None,
                                divergence: float | None, check_finite: bool,
                                values: list[float]) -> None:
    """Feed the same sequence to Lightning's EarlyStopping and ours: same decision, counter, best
    and stop reason after every value."""
    pl_es_mod = pytest.importorskip("pytorch_lightning.callbacks.early_stopping")
    import torch

    theirs = pl_es_mod.EarlyStopping(monitor="m", mode=mode, patience=patience,
                                     min_delta=min_delta, stopping_threshold=stopping,
                                     divergence_threshold=divergence, check_finite=check_finite)
    ours = EarlyStopping(monitor="m", mode=mode, patience=patience, min_delta=min_delta,
                         stopping_threshold=stopping, divergence_threshold=divergence,
                         check_finite=check_finite)
    names = {0: "not_stopped", 1: "stopping_threshold", 2: "divergence_threshold",
             3: "patience_exhausted", 4: "non_finite"}
    for value in values:
        their_stop, _ = theirs._evaluate_stopping_criteria(torch.tensor(value))
        our_stop = ours.update(value)
        assert our_stop == their_stop, (value, ours.state_dict())
        assert ours.wait_count == theirs.wait_count
        their_best = float(theirs.best_score)
        assert ours.best == their_best or (math.isnan(ours.best) and math.isnan(their_best))
        assert ours.reason_code == names[theirs.stopping_reason.value]
