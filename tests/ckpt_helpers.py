"""A realistic training state for checkpoint tests, and deep comparison."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from distrib.runtime.rng import capture_rng


def training_state(seed: int = 0, width: int = 64) -> dict[str, Any]:
    """Model + Adam (with state) + scheduler + GradScaler + RNG + odd dtypes and Python values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu")
    np.random.seed(seed)
    random.seed(seed)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # integer state keys, tuple betas, tensor steps
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng(),
        "odd": {"bf16": torch.randn(5, 3).to(torch.bfloat16), "bool": torch.tensor([True, False]),
                "int64": torch.arange(7), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
                "strided": torch.arange(12.0).reshape(3, 4).t(), "numpy": np.arange(5),
                "floats": [math.inf, -math.inf, math.nan, 0.1], "tuple": (1, "a", None),
                (1, 2): "tuple key", 7: "int key", "__tensor__": "a tricky key"},
    }


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality: bit-identical tensors (dtype and shape), same container types."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), (where, a, b)
