"""``python -m distrib.train`` (and ``torchrun ... -m distrib.train``): the training command.

Everything the user can get wrong is checked before the process group exists and before anything
is written: flags and the config file (argparse, :mod:`distrib.config`, every value range-checked),
the checkpoint and log locations (:mod:`distrib.checkpoint.preflight`: scheme, storage options, a writable
directory, the bucket, the credentials), the tensorboard package for ``--tensorboard``, the task
import, the task's own option checks and the monitored metric. Each problem is one line on stderr and exit
code 2 (:data:`distrib.exitcodes.PERMANENT`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from distrib import exitcodes
from distrib.config import Config, build_parser, config_from_namespace

PROG = "python -m distrib.train"
log = logging.getLogger("distrib.train")


def _extra_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check-config", action="store_true",
                        help="check the options, the task and the checkpoint URL, then exit "
                        "(0 if everything is fine, 2 otherwise) without training")


def prepare(argv: Sequence[str] | None) -> tuple[Config, "object", bool]:
    """Parse and check everything; return the config, the built task and whether only a check
    was asked for. Raises ConfigError (argparse exits 2 on an unknown flag)."""
    ns = build_parser(PROG, extra=_extra_flags).parse_args(argv)
    config = config_from_namespace(ns)
    from distrib.checkpoint.preflight import check_locations
    from distrib.tasks import build_task

    check_locations(config)
    task = build_task(config)
    from distrib.training.data import check_data
    from distrib.training.trainer import Trainer

    Trainer.check_monitor(config, task)
    check_data(config, task)
    return config, task, bool(ns.check_config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the process exit code (see :mod:`distrib.exitcodes`), which is
    also written to ``$DISTRIB_STATUS_DIR/rank-$RANK`` for ``python -m distrib.launch``."""
    return exitcodes.exit_code(lambda: _run(argv), PROG)


def _run(argv: Sequence[str] | None) -> None:
    config, task, check_only = prepare(argv)
    if check_only:
        print(f"{PROG}: configuration OK (task {config.train.task}, checkpoints in "
              f"{config.ckpt.checkpoint_dir})")
        return
    from distrib.runtime.logs import setup_logging
    from distrib.training.trainer import Trainer

    setup_logging(level=config.log.log_level)  # the command line's log format (rank from $RANK)

    Trainer(config, task).fit()  # type: ignore[arg-type]


def exit_now(code: int) -> None:
    """Flush everything and leave without interpreter finalization.

    Everything that matters is committed by then (checkpoints, COMPLETE marker, status file) and
    the process group is destroyed, so finalizing the interpreter (about 1.4 s of CPU per rank
    with torch and torch._dynamo loaded: collecting and freeing every module) buys nothing. It
    used to hide an abort at exit as well ("terminate called without an active exception"); that
    one's cause is fixed in :func:`distrib.runtime.dist.setup`, and Python API runs, which exit normally,
    are tested for it (tests/test_distributed.py).
    """
    exitcodes.leave(code)


def cli() -> None:
    """The ``distrib-train`` console script."""
    exit_now(main())


if __name__ == "__main__":
    cli()
