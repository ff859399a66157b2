"""The tasks the benchmark trains (``--task distrib.bench.tasks:mlp``).

``mlp``: a ReLU MLP classifier on synthetic data drawn from the seed. Task args: ``features``,
``hidden``, ``depth`` (hidden ``Linear(hidden, hidden)`` layers), ``samples``, ``val`` (validation
samples, 0 for none). Its size sets both the step time and the checkpoint size.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrib import Config, Task
from distrib.tasks import task_arg

CLASSES = 10


def _data(seed: int, n: int, features: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, CLASSES, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def mlp(config: Config) -> Task:
    features = task_arg(config, "features", int, 256)
    hidden = task_arg(config, "hidden", int, 1024)
    layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
    for _ in range(task_arg(config, "depth", int, 2)):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, CLASSES))
    seed = config.train.seed
    n_val = task_arg(config, "val", int, 0)
    return Task(model=nn.Sequential(*layers),
                train_dataset=_data(seed, task_arg(config, "samples", int, 8192), features),
                val_dataset=_data(seed + 1, n_val, features) if n_val else None,
                loss_fn=nn.CrossEntropyLoss())


def layer_plan(nbytes: int, widest: int = 2048) -> tuple[int, int]:
    """(width, count) of square float32 ``Linear`` layers whose parameters plus Adam state (three
    copies) hold at least ``nbytes``: ``widest`` wide, narrower for small sizes."""
    def per_layer(w: int) -> int:
        return 3 * 4 * (w * w + w)  # weight + bias; param, exp_avg, exp_avg_sq
    width = widest if nbytes >= 4 * per_layer(widest) else max(8, math.isqrt(nbytes // 48))
    return width, max(1, -(-nbytes // per_layer(width)))


def state_args(nbytes: int) -> list[str]:
    """``--task-arg`` flags for an ``mlp`` whose parameters plus Adam state hold >= ``nbytes``."""
    width, layers = layer_plan(nbytes)
    depth = layers - 1  # the input layer is the first one
    return ["--task-arg", f"features={width}", "--task-arg", f"hidden={width}",
            "--task-arg", f"depth={depth}", "--task-arg", "samples=4096"]
