"""distrib: data-parallel PyTorch training that survives preemption and node failure.

The Python API::

    from distrib import Config, Trainer, Task
    config = Config.from_args(["--max-epochs", "5", "--checkpoint-dir", "s3://bucket/run1"])
    result = Trainer(config, task=my_task).fit()   # on every rank
"""

from distrib.config import (CheckpointConfig, Config, ConfigError, EarlyStopConfig, LogConfig,
                            OptimConfig, SchedConfig, TrainConfig)
from distrib.early_stopping import EarlyStopping
from distrib.tasks import Task
from distrib.trainer import Callback, FitResult, Trainer

__version__ = "0.1.0"

__all__ = ["Callback", "CheckpointConfig", "Config", "ConfigError", "EarlyStopConfig",
           "EarlyStopping", "FitResult", "LogConfig", "OptimConfig", "SchedConfig", "Task",
           "TrainConfig", "Trainer", "__version__"]
