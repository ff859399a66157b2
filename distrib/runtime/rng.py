"""Random-number state and seeds: everything random derives from (seed, purpose, rank, epoch).

* :func:`derive_seed` mixes any parts into a 63-bit seed, so seeds for different purposes never
  collide (``seed + rank`` would make rank 1 of seed 0 equal rank 0 of seed 1).
* :func:`capture_rng` / :func:`restore_rng` cover torch (CPU and every CUDA device), numpy's global
  generator and Python's ``random``; the result contains only tensors, numbers and tuples, so it
  round-trips through :mod:`distrib.checkpoint.serialization` without pickle.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A well-mixed 63-bit seed from any printable parts, stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and ``random`` follow the worker's torch seed, which the
    loader derives from its generator (itself seeded from seed, epoch and rank)."""
    base = torch.initial_seed()
    np.random.seed(base % 2**32)
    random.seed(base)


def capture_rng() -> dict[str, Any]:
    """This process's complete RNG state."""
    legacy: Any = np.random.get_state()
    name, keys, pos, has_gauss, cached = legacy
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s result (CUDA states only if as many devices are present)."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda_states])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
