"""distrib: data-parallel PyTorch training that survives preemption and node failure.

The Python API::

    import sys
    from distrib import Config, Trainer, exit_code

    def main() -> None:
        config = Config.from_args(["--max-epochs", "5", "--checkpoint-dir", "s3://bucket/run1"])
        result = Trainer(config, task=build).fit()   # on every rank; build(config) -> Task

    sys.exit(exit_code(main))   # 0 done, 1 failed, 2 bad input, 75 preempted

The package is laid out by layer, each importing only those before it: :mod:`distrib.config`;
:mod:`distrib.runtime` (process group and collectives, preemption, RNG, the DDP strategy,
logging); :mod:`distrib.checkpoint` (storage, format, store, lease, checkpointer, the manager);
:mod:`distrib.records` (run records, the report's picture); :mod:`distrib.tasks` and
:mod:`distrib.training` (the Trainer and what it uses); and on top the command lines
``python -m distrib.train / launch / ckpt / report / bench`` with :mod:`distrib.exitcodes`.

The public names below are imported when first used, so ``python -m distrib.train --help`` or a
bad flag does not wait for torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "CheckpointConfig": "distrib.config", "Config": "distrib.config",
    "ConfigError": "distrib.config", "EarlyStopConfig": "distrib.config",
    "LogConfig": "distrib.config", "OptimConfig": "distrib.config",
    "SchedConfig": "distrib.config", "TrainConfig": "distrib.config",
    "EarlyStopping": "distrib.training.early_stopping", "exit_code": "distrib.exitcodes",
    "setup_logging": "distrib.runtime.logs", "CheckpointManager": "distrib.checkpoint.manager",
    "Resume": "distrib.checkpoint.manager", "Preempted": "distrib.runtime.preemption", "Task": "distrib.tasks",
    "Callback": "distrib.training.trainer", "FitResult": "distrib.training.trainer",
    "Trainer": "distrib.training.trainer",
}
__all__ = ["Callback", "CheckpointConfig", "CheckpointManager", "Config", "ConfigError",
           "EarlyStopConfig", "EarlyStopping", "FitResult", "LogConfig", "OptimConfig", "Preempted", "Resume",
           "SchedConfig", "Task", "TrainConfig", "Trainer", "__version__", "exit_code",
           "setup_logging"]

if TYPE_CHECKING:
    from distrib.checkpoint.manager import CheckpointManager, Resume
    from distrib.config import (
        CheckpointConfig,
        Config,
        ConfigError,
        EarlyStopConfig,
        LogConfig,
        OptimConfig,
        SchedConfig,
        TrainConfig,
    )
    from distrib.exitcodes import exit_code
    from distrib.runtime.logs import setup_logging
    from distrib.runtime.preemption import Preempted
    from distrib.tasks import Task
    from distrib.training.early_stopping import EarlyStopping
    from distrib.training.trainer import Callback, FitResult, Trainer


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'distrib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if "torch" in sys.modules:  # a script that imported torch first (an own loop): get
    # torch.distributed.nn.functional imported before the script creates its process group
    # (see distrib.runtime.dist); cheap once torch is loaded
    importlib.import_module("distrib.runtime.dist")
