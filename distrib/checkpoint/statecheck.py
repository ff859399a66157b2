"""Check a loaded state against the live objects it is about to be loaded into.

A checkpoint can pass every format check (:mod:`distrib.checkpoint.format`) and still not fit: another
model, another optimizer, a hand-edited state file with consistent checksums. Loading such a state
would fail half-way through (``load_state_dict`` copies what matches, then raises) or, worse, inject
values of the wrong kind. These checks run before anything changes; each raises
:class:`~distrib.checkpoint.format.InvalidCheckpoint` with a one-line reason, so the checkpoint is skipped
like a damaged one and the next older one is tried.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

from distrib.checkpoint.format import InvalidCheckpoint


def _fail(what: str, why: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(f"{what}: {why}")


def _names(keys: Any, limit: int = 4) -> str:
    keys = sorted(map(str, keys))
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_like(saved: Any, live: Any, what: str, *, subset: bool = False) -> None:
    """``saved`` has the structure of ``live`` (a ``state_dict()`` of the object it will be loaded
    into): the same keys (with ``subset``, no keys ``live`` lacks), lists of the same length,
    tensors of the same shape and dtype, numbers where numbers are, strings where strings are.
    Where ``live`` holds None anything JSON-like is accepted."""
    stack = [(saved, live, what)]
    while stack:
        s, live_part, where = stack.pop()
        if live_part is None:
            continue
        if isinstance(live_part, torch.Tensor):
            if not isinstance(s, torch.Tensor) or s.shape != live_part.shape or s.dtype != live_part.dtype:
                got = (f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor)
                       else type(s).__name__)
                raise _fail(where, f"expected a {live_part.dtype} tensor of shape {tuple(live_part.shape)}, got "
                            f"{got}")
        elif isinstance(live_part, Mapping):
            if not isinstance(s, Mapping):
                raise _fail(where, f"expected a mapping, got {type(s).__name__}")
            extra, missing = set(s) - set(live_part), set(live_part) - set(s)
            if extra or (missing and not subset):
                raise _fail(where, "keys do not fit"
                            + (f"; unexpected: {_names(extra)}" if extra else "")
                            + (f"; missing: {_names(missing)}" if missing and not subset else ""))
            stack.extend((s[k], live_part[k], f"{where}.{k}") for k in s)
        elif isinstance(live_part, (list, tuple)):
            if not isinstance(s, (list, tuple)) or len(s) != len(live_part):
                raise _fail(where, f"expected a sequence of {len(live_part)}, got {_kind(s)}")
            stack.extend((a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(s, live_part)))
        elif isinstance(live_part, bool):
            if not isinstance(s, bool):
                raise _fail(where, f"expected true or false, got {_kind(s)}")
        elif isinstance(live_part, (int, float)):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise _fail(where, f"expected a number, got {_kind(s)}")
        elif isinstance(live_part, str) and not isinstance(s, str):
            raise _fail(where, f"expected a string, got {_kind(s)}")


def _kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a sequence of {len(value)}"
    return type(value).__name__


def check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, what: str = "optimizer") -> None:
    """``saved`` is an optimizer ``state_dict()`` that ``optimizer.load_state_dict`` maps onto its
    parameters: the same groups of the same sizes, state only for those parameters, and every
    per-parameter tensor (momentum, Adam's moments) of its parameter's shape."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) \
            or not isinstance(saved.get("param_groups"), list):
        raise _fail(what, "expected a mapping with 'state' and 'param_groups'")
    live = optimizer.param_groups
    groups = saved["param_groups"]
    if len(groups) != len(live):
        raise _fail(what, f"{len(groups)} parameter groups, this optimizer has {len(live)}")
    params: dict[Any, torch.Tensor] = {}
    for i, (g, lg) in enumerate(zip(groups, live)):
        ids = g.get("params") if isinstance(g, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(lg["params"]) or \
                any(type(p) is not int for p in ids):
            raise _fail(what, f"parameter group {i} does not fit this optimizer's")
        check_like({k: v for k, v in g.items() if k != "params"},
                   {k: v for k, v in lg.items() if k != "params"}, f"{what} group {i}",
                   subset=True)
        params.update(zip(ids, lg["params"]))
    if len(params) != sum(len(g["params"]) for g in live):
        raise _fail(what, "a parameter is listed twice")
    for pid, state in saved["state"].items():
        if pid not in params or not isinstance(state, Mapping):
            raise _fail(what, f"state for an unknown parameter {pid!r}")
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 \
                    and value.shape != params[pid].shape:
                raise _fail(what, f"{key} of parameter {pid} has shape {tuple(value.shape)}, "
                            f"the parameter {tuple(params[pid].shape)}")


def check_rng(saved: Any, what: str = "rng") -> None:
    """``saved`` is a :func:`distrib.runtime.rng.capture_rng` result that restores cleanly (tried on
    scratch generators, so the process's own streams are untouched)."""
    try:
        if not isinstance(saved, Mapping):
            raise TypeError(f"expected a mapping, got {type(saved).__name__}")
        state = saved["torch"]
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise TypeError("torch state is not a uint8 tensor")
        torch.Generator().set_state(state.cpu())
        for cuda in saved.get("cuda") or []:
            if not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8 or cuda.dim() != 1:
                raise TypeError("a CUDA state is not a uint8 vector")
        n = saved["numpy"]
        keys = n["keys"]
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64:
            raise TypeError("numpy keys are not an int64 tensor")
        np.random.RandomState().set_state(
            (n["name"], keys.numpy().astype(np.uint32), n["pos"], n["has_gauss"],
             n["cached_gaussian"]))
        version, internal, gauss = saved["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise _fail(what, f"not a restorable RNG state ({exc})") from None


def check_number(value: Any, what: str, *, integer: bool = False, lo: float = 0,
                 optional: bool = False) -> None:
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < lo:
        raise _fail(what, f"expected {'an integer' if integer else 'a number'} >= {lo:g}, "
                    f"got {value!r}"[:200])
