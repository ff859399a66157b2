"""The built-in tasks, precision modes and the Python API, in one process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distrib import Config, Trainer
from distrib.config import ConfigError
from distrib.tasks import build_task


def _fit(tmp_path: Path, *argv: str):  # type: ignore[no-untyped-def]
    return Trainer(Config.from_args(["--checkpoint-dir", str(tmp_path / "ck"), "--no-progress",
                                     "--log-level", "warning", *argv])).fit()


@pytest.mark.parametrize("loss", ["mse", "l1", "smooth-l1"])
def test_sequence_task_learns_with_each_loss(tmp_path: Path, loss: str) -> None:
    result = _fit(tmp_path, "--task", "distrib.tasks.sequence:build", "--loss", loss,
                  "--max-epochs", "3", "--task-arg", "train_samples=512",
                  "--task-arg", "val_samples=128", "--lr", "0.01", "--no-early-stop")
    maes = [h["val_mae"] for h in result.history]
    assert maes[-1] < maes[0]
    assert all(math.isfinite(m) for m in maes)


def test_sequence_task_rejects_cross_entropy() -> None:
    with pytest.raises(ConfigError, match="--loss: the sequence task supports"):
        build_task(Config.from_args(["--task", "distrib.tasks.sequence:build",
                                     "--loss", "cross-entropy"]))


def test_classifier_data_is_a_function_of_the_seed() -> None:
    a = build_task(Config.from_args(["--seed", "1", "--task-arg", "train_samples=64"]))
    b = build_task(Config.from_args(["--seed", "1", "--task-arg", "train_samples=64"]))
    c = build_task(Config.from_args(["--seed", "2", "--task-arg", "train_samples=64"]))
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(a.train_dataset.tensors[0], c.train_dataset.tensors[0])  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path: Path, precision: str) -> None:
    result = _fit(tmp_path, "--task", "tests.tasks:tiny", "--precision", precision,
                  "--max-epochs", "2", "--clip-grad-norm", "1.0")
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] + 0.5


@pytest.mark.parametrize("scheduler", ["step", "cosine", "warmup-cosine"])
def test_per_step_schedules_change_the_lr(tmp_path: Path, scheduler: str) -> None:
    result = _fit(tmp_path, "--task", "tests.tasks:tiny", "--scheduler", scheduler,
                  "--step-size", "1", "--warmup-steps", "3", "--max-epochs", "3",
                  "--no-early-stop")
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] < 1e-3 and len(set(lrs)) == 3


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(tmp_path: Path, optimizer: str) -> None:
    result = _fit(tmp_path, "--task", "tests.tasks:tiny", "--optimizer", optimizer,
                  "--max-epochs", "3", "--lr", "0.01", "--no-early-stop",
                  "--clip-grad-value", "5")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_python_api_with_a_user_task(tmp_path: Path) -> None:
    """A user builds a Task in their own script and drives the trainer directly."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from distrib import Task

    x = torch.randn(128, 4)
    y = x.sum(dim=1, keepdim=True)
    task = Task(model=nn.Linear(4, 1), train_dataset=TensorDataset(x, y),
                val_dataset=TensorDataset(x[:32], y[:32]), loss_fn=nn.MSELoss(),
                optimizer_factory=lambda params, cfg: torch.optim.SGD(params, lr=0.05))
    config = Config.from_args(["--checkpoint-dir", str(tmp_path / "ck"), "--max-epochs", "5",
                               "--batch-size", "16", "--log-level", "warning", "--no-early-stop"])
    result = Trainer(config, task=task).fit()
    assert result.stop_reason == "max_epochs" and result.epochs == 5
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] / 2
