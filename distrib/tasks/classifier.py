"""The default task: an MLP classifier on a synthetic, seed-generated data set that overfits.

The data are Gaussian clusters (several per class, overlapping) with a fraction of labels flipped at
random. The training set is small for the model, so after a few epochs the model starts memorising
the flipped labels: training loss keeps falling while validation loss turns up, which is what early
stopping is for. Nothing is downloaded.

``--task-arg`` keys: ``train_samples``, ``val_samples``, ``features``, ``classes``, ``hidden``,
``label_noise``, ``dropout``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrib.config import Config, ConfigError
from distrib.tasks import Task, check_memory, check_task_args, task_arg

# Tuned so that with the default optimizer (AdamW, lr 1e-3, 2 ranks x 64) validation loss bottoms
# out around epoch 4 and then climbs while training loss keeps falling.
_DEFAULTS = {"train_samples": 16384, "val_samples": 4096, "features": 32, "classes": 8,
             "hidden": 1024, "label_noise": 0.2, "dropout": 0.0}
# (lo, hi) of each option; dropout must stay below 1
_RANGES = {"train_samples": (1, 10**8), "val_samples": (1, 10**8), "features": (1, 2**20),
           "classes": (2, 2**20), "hidden": (1, 2**20), "label_noise": (0, 1),
           "dropout": (0, 0.999)}
_CLUSTERS_PER_CLASS = 16
_CLUSTER_SPREAD = 0.6


def make_dataset(seed: int, train_samples: int, val_samples: int, features: int, classes: int,
                 label_noise: float) -> tuple[TensorDataset, TensorDataset]:
    """Deterministic train/validation sets from ``seed`` (same on every rank and every run)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * _CLUSTERS_PER_CLASS, features, generator=g) * _CLUSTER_SPREAD
    total = train_samples + val_samples
    cluster = torch.randint(0, classes * _CLUSTERS_PER_CLASS, (total,), generator=g)
    x = centers[cluster] + torch.randn(total, features, generator=g)
    y = cluster % classes
    flip = torch.rand(total, generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, classes, (total,), generator=g), y)
    return (TensorDataset(x[:train_samples], y[:train_samples]),
            TensorDataset(x[train_samples:], y[train_samples:]))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1.0 per correctly classified sample, else 0.0."""
    return (output.argmax(dim=-1) == target).float()


def build(config: Config) -> Task:
    """Build the classifier task from ``config`` (see the module docstring for its options)."""
    check_task_args(config, _DEFAULTS)
    opts = {k: task_arg(config, k, type(v), v, lo=_RANGES[k][0], hi=_RANGES[k][1])
            for k, v in _DEFAULTS.items()}
    if config.train.loss not in ("auto", "cross-entropy"):
        raise ConfigError(f"--loss: the classifier task supports auto or cross-entropy "
                          f"(got {config.train.loss})")
    features, hidden, classes = opts["features"], opts["hidden"], opts["classes"]
    params = features * hidden + hidden * hidden + hidden * classes
    check_memory(config, 4 * (features * (opts["train_samples"] + opts["val_samples"])
                              + 4 * params))  # data, and weights + grads + Adam's two moments
    train, val = make_dataset(config.train.seed, opts["train_samples"], opts["val_samples"],
                              opts["features"], opts["classes"], opts["label_noise"])
    hidden = opts["hidden"]
    model = nn.Sequential(
        nn.Linear(opts["features"], hidden), nn.ReLU(), nn.Dropout(opts["dropout"]),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(opts["dropout"]),
        nn.Linear(hidden, opts["classes"]),
    )
    return Task(model=model, train_dataset=train, val_dataset=val, loss_fn=nn.CrossEntropyLoss(),
                metrics={"accuracy": accuracy})
