"""An LSTM regressor on synthetic time series: predict the next value of a noisy signal.

Each sample is a window of a sum of two sinusoids with random frequency, phase and amplitude plus
noise; the target is the value that follows the window. The loss is ``--loss mse`` (the default),
``l1`` or ``smooth-l1``; the mean absolute error is reported as a metric. Nothing is downloaded.

``--task-arg`` keys: ``train_samples``, ``val_samples``, ``window``, ``hidden``, ``noise``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrib.config import Config, ConfigError
from distrib.tasks import Task, check_memory, check_task_args, task_arg

_DEFAULTS = {"train_samples": 2048, "val_samples": 512, "window": 32, "hidden": 32, "noise": 0.05}
_RANGES = {"train_samples": (1, 10**8), "val_samples": (1, 10**8), "window": (1, 2**16),
           "hidden": (1, 2**16), "noise": (0, 1e6)}
_LOSSES = {"auto": nn.MSELoss, "mse": nn.MSELoss, "l1": nn.L1Loss, "smooth-l1": nn.SmoothL1Loss}


def make_series(seed: int, samples: int, window: int, noise: float) -> TensorDataset:
    """``samples`` windows of shape (window, 1) and their next values, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(window + 1, dtype=torch.float32)
    freq = torch.rand(samples, 2, 1, generator=g) * 0.4 + 0.05
    phase = torch.rand(samples, 2, 1, generator=g) * 2 * math.pi
    amp = torch.rand(samples, 2, 1, generator=g) + 0.5
    signal = (amp * torch.sin(freq * t + phase)).sum(dim=1)
    signal = signal + noise * torch.randn(signal.shape, generator=g)
    return TensorDataset(signal[:, :window].unsqueeze(-1), signal[:, window:])


class LSTMRegressor(nn.Module):
    """One LSTM layer over the window, a linear head on the last hidden state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        result: torch.Tensor = self.head(out[:, -1])
        return result


def absolute_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute error."""
    return (output - target).abs().reshape(len(output), -1).mean(dim=1)


def build(config: Config) -> Task:
    """Build the sequence task from ``config`` (see the module docstring for its options)."""
    check_task_args(config, _DEFAULTS)
    opts = {k: task_arg(config, k, type(v), v, lo=_RANGES[k][0], hi=_RANGES[k][1])
            for k, v in _DEFAULTS.items()}
    if config.train.loss not in _LOSSES:
        raise ConfigError(f"--loss: the sequence task supports {', '.join(_LOSSES)} "
                          f"(got {config.train.loss})")
    hidden = opts["hidden"]
    check_memory(config, 4 * ((opts["window"] + 2) * (opts["train_samples"] + opts["val_samples"])
                              + 4 * (4 * hidden * (hidden + 2) + hidden + 1)))
    seed = config.train.seed
    train = make_series(seed, opts["train_samples"], opts["window"], opts["noise"])
    val = make_series(seed + 1, opts["val_samples"], opts["window"], opts["noise"])
    return Task(model=LSTMRegressor(opts["hidden"]), train_dataset=train, val_dataset=val,
                loss_fn=_LOSSES[config.train.loss](), metrics={"mae": absolute_error})
