"""``python -m distrib.train`` (and ``torchrun ... -m distrib.train``): the training command.

Everything the user can get wrong is checked before the process group exists and before anything
is written: flags and the config file (argparse, :mod:`distrib.config`), the checkpoint URL's scheme,
the task import, the task's own option checks and the monitored metric. Each problem is one line on
stderr and exit code 2 (:data:`distrib.exitcodes.PERMANENT`).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from distrib import exitcodes
from distrib.config import Config, ConfigError, parse_args

PROG = "python -m distrib.train"
log = logging.getLogger("distrib.train")


def prepare(argv: Sequence[str] | None) -> tuple[Config, "object"]:
    """Parse and check everything; return the config and the built task. Raises ConfigError."""
    config = parse_args(argv)
    from distrib.storage import check_url
    from distrib.tasks import build_task

    for flag, url in (("--checkpoint-dir", config.ckpt.checkpoint_dir),
                      ("--resume", config.ckpt.resume)):
        if flag == "--resume" and url in ("auto", "never"):
            continue
        try:
            check_url(url)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    task = build_task(config)
    from distrib.trainer import Trainer

    Trainer.check_monitor(config, task)
    return config, task


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the process exit code (see :mod:`distrib.exitcodes`)."""
    try:
        config, task = prepare(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else exitcodes.PERMANENT
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exitcodes.PERMANENT
    from distrib.checkpoint import CheckpointError, SaveFailedError
    from distrib.trainer import Trainer

    try:
        Trainer(config, task).fit()  # type: ignore[arg-type]
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


if __name__ == "__main__":
    sys.exit(main())
