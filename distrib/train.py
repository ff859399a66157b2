"""``python -m distrib.train`` (and ``torchrun ... -m distrib.train``): the training command.

Everything the user can get wrong is checked before the process group exists and before anything
is written: flags and the config file (argparse, :mod:`distrib.config`, every value range-checked),
the checkpoint and log locations (:mod:`distrib.preflight`: scheme, storage options, a writable
directory, the bucket, the credentials), the tensorboard package for ``--tensorboard``, the task
import, the task's own option checks and the monitored metric. Each problem is one line on stderr and exit
code 2 (:data:`distrib.exitcodes.PERMANENT`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from distrib import exitcodes
from distrib.config import Config, ConfigError, build_parser, config_from_namespace

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
    from distrib.preflight import check_locations
    from distrib.tasks import build_task

    check_locations(config)
    task = build_task(config)
    from distrib.data import check_data
    from distrib.trainer import Trainer

    Trainer.check_monitor(config, task)
    check_data(config, task)
    return config, task, bool(ns.check_config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the process exit code (see :mod:`distrib.exitcodes`), which is
    also written to ``$DISTRIB_STATUS_DIR/rank-$RANK`` for ``python -m distrib.launch``."""
    code = _run(argv)
    status_dir = os.environ.get("DISTRIB_STATUS_DIR")
    if status_dir:
        try:
            with open(os.path.join(status_dir, f"rank-{os.environ.get('RANK', '0')}"), "w") as fh:
                fh.write(str(code))
        except OSError:
            pass  # the launcher then falls back to torchrun's own exit code
    return code


def _run(argv: Sequence[str] | None) -> int:
    try:
        config, task, check_only = prepare(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else exitcodes.PERMANENT
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exitcodes.PERMANENT
    if check_only:
        print(f"{PROG}: configuration OK (task {config.train.task}, checkpoints in "
              f"{config.ckpt.checkpoint_dir})")
        return exitcodes.OK
    from distrib.checkpoint import CheckpointError, SaveFailedError
    from distrib.preemption import Preempted
    from distrib.trainer import Trainer

    try:
        Trainer(config, task).fit()  # type: ignore[arg-type]
    except Preempted:
        return exitcodes.PREEMPTED
    except CheckpointError as exc:
        log.error("%s", exc)
        return exitcodes.PERMANENT
    except SaveFailedError as exc:
        log.error("%s", exc)
        return exitcodes.FAILURE
    except KeyboardInterrupt:
        log.error("interrupted")
        return exitcodes.FAILURE
    except Exception:
        log.exception("training failed")
        return exitcodes.FAILURE
    return exitcodes.OK


def exit_now(code: int) -> None:
    """Flush everything and leave without running C++ static destructors.

    Everything that matters is committed by then (checkpoints, COMPLETE marker, status file) and
    the process group is destroyed. Rarely (seen twice in hundreds of runs, under load), tearing
    down c10d's TCPStore and gloo threads at interpreter exit aborts with "terminate called
    without an active exception", which torchrun reports as a failed worker of a finished run.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The ``distrib-train`` console script."""
    exit_now(main())


if __name__ == "__main__":
    cli()
