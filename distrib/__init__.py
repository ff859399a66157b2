"""distrib: data-parallel PyTorch training that survives preemption and node failure.

The Python API::

    import sys
    from distrib import Config, Trainer, exit_code

    def main() -> None:
        config = Config.from_args(["--max-epochs", "5", "--checkpoint-dir", "s3://bucket/run1"])
        result = Trainer(config, task=build).fit()   # on every rank; build(config) -> Task

    sys.exit(exit_code(main))   # 0 done, 1 failed, 2 bad input, 75 preempted
"""

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
from distrib.early_stopping import EarlyStopping
from distrib.exitcodes import exit_code
from distrib.logs import setup_logging
from distrib.manager import CheckpointManager, Resume
from distrib.tasks import Task
from distrib.trainer import Callback, FitResult, Trainer

__version__ = "0.1.0"

__all__ = ["Callback", "CheckpointConfig", "CheckpointManager", "Config", "ConfigError", "EarlyStopConfig",
           "EarlyStopping", "FitResult", "LogConfig", "OptimConfig", "Resume", "SchedConfig", "Task",
           "TrainConfig", "Trainer", "__version__", "exit_code", "setup_logging"]
