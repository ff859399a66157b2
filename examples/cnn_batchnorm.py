"""A small convolutional classifier with BatchNorm (the torchvision ResNet pattern: conv, batch
norm, ReLU, a residual block, global pooling) on synthetic images::

    torchrun --nproc_per_node=2 -m distrib.train --task examples.cnn_batchnorm:build --max-epochs 3

BatchNorm's running statistics are buffers: DDP broadcasts rank 0's at every forward pass, and
checkpoints carry them with the weights, so a resumed run is bit-identical to an uninterrupted one.
The images are class-dependent patterns plus noise, generated from the index and the seed.

``--task-arg`` keys: ``samples``, ``size`` (pixels per side), ``classes``, ``channels``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from distrib import Config, Task
from distrib.tasks import task_arg
from distrib.tasks.classifier import accuracy


class Images(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, seed: int, samples: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(classes, 3, size, size, generator=g)
        self.seed, self.samples, self.classes = seed, samples, classes

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(0, self.classes, (1,), generator=g))
        image = self.patterns[label] + 1.5 * torch.randn(self.patterns.shape[1:], generator=g)
        return image, torch.tensor(label)


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input: a ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def build(config: Config) -> Task:
    samples = task_arg(config, "samples", int, 1024, lo=16, hi=10**7)
    size = task_arg(config, "size", int, 16, lo=4, hi=512)
    classes = task_arg(config, "classes", int, 4, lo=2, hi=1000)
    channels = task_arg(config, "channels", int, 16, lo=1, hi=512)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        Block(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    seed = config.train.seed
    return Task(model=model, train_dataset=Images(seed, samples, size, classes),
                val_dataset=Images(seed, max(16, samples // 4), size, classes),
                loss_fn=nn.CrossEntropyLoss(), metrics={"accuracy": accuracy})
