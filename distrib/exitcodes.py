"""The process exit codes of ``python -m distrib.train`` and ``python -m distrib.launch``, for
schedulers that decide on retries (a Kubernetes ``podFailurePolicy``, a SLURM requeue script).

=====  ===============  =======================================================================
code   name             meaning, and what a scheduler should do
=====  ===============  =======================================================================
0      ``OK``           training finished (or had already finished): done
1      ``FAILURE``      an unexpected error, or checkpoint saves kept failing (possibly
                        transient): retry within a budget
2      ``PERMANENT``    bad configuration, or checkpoints exist and none can be loaded: do not
                        retry, a human must look
75     ``PREEMPTED``    a preemption notice (SIGTERM, SIGUSR1) arrived; an emergency checkpoint
                        was written: retry, and do not count it as a failure
=====  ===============  =======================================================================

``torchrun`` itself exits 1 whenever a worker fails or it is signalled, whatever the workers'
codes; ``python -m distrib.launch`` (a drop-in for ``torchrun``) passes these codes through.

A script that drives :class:`distrib.Trainer` itself gets the same codes with one line::

    sys.exit(distrib.exit_code(main))
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

OK = 0
FAILURE = 1
PERMANENT = 2
PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "temporary failure, the user is invited to retry"

NAMES = {OK: "ok", FAILURE: "failure", PERMANENT: "permanent", PREEMPTED: "preempted"}


def exit_code(main: Callable[[], object], prog: str | None = None) -> int:
    """Run ``main()`` and return the exit code a scheduler should see (the table above); also
    report it to ``python -m distrib.launch`` (``$DISTRIB_STATUS_DIR/rank-$RANK``).

    A :class:`~distrib.ConfigError` is printed as one line (``prog: error: ...``) and gives 2,
    as does a checkpoint error that retrying cannot fix; a preemption gives 75; save failures
    and any other exception give 1 (the unexpected ones with their traceback in the log).
    Call it on every rank: ``sys.exit(distrib.exit_code(main))``. In a torchrun (or
    ``distrib.launch``) worker of a job of more than one rank it does not return: it flushes
    logging and the standard streams and ends the process with that code (``os._exit``, as
    ``python -m distrib.train`` does), so ``atexit`` handlers do not run there.
    """
    code = _run(main, prog or os.path.basename(sys.argv[0] or "python"))
    status_dir = os.environ.get("DISTRIB_STATUS_DIR")
    if status_dir:
        try:
            with open(os.path.join(status_dir, f"rank-{os.environ.get('RANK', '0')}"), "w") as fh:
                fh.write(str(code))
        except OSError:
            pass  # the launcher then falls back to torchrun's own exit code
    if _world_size() > 1 and "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        # A DDP module sits in reference cycles and holds the process group, so a script's
        # group outlives main() (destroy_process_group() or not); its gloo threads then meet
        # interpreter finalization and abort the process ("terminate called without an active
        # exception", exit -6; 1 in 6 to 10 two-rank runs of examples/own_loop.py), and a
        # gc.collect() here instead can deadlock in the group's destructor. Everything that
        # matters is committed and the status written: leave as the command line does.
        leave(code)
    return code


def leave(code: int) -> None:
    """Flush logging and the standard streams, then end the process with ``code`` without
    interpreter finalization (``os._exit``: ``atexit`` handlers do not run)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    return int(raw) if raw.isdigit() else 1


def _run(main: Callable[[], object], prog: str) -> int:
    from distrib.config import ConfigError  # no torch: a bad flag is reported at once

    try:
        main()
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, message already printed)
        return exc.code if isinstance(exc.code, int) else PERMANENT
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return PERMANENT
    except KeyboardInterrupt:
        logging.getLogger("distrib").error("interrupted")
        return FAILURE
    except Exception as exc:
        return _code_of(exc)
    return OK


def _code_of(exc: Exception) -> int:
    """The exit code of an exception that ended ``main()``, logged (imports torch: only here)."""
    from distrib.checkpoint.store import CheckpointError, SaveFailedError
    from distrib.runtime.preemption import Preempted

    log = logging.getLogger("distrib")
    if isinstance(exc, Preempted):
        return PREEMPTED
    if isinstance(exc, (CheckpointError, SaveFailedError)):
        log.error("%s", exc)
        return PERMANENT if isinstance(exc, CheckpointError) else FAILURE
    log.error("training failed", exc_info=exc)
    return FAILURE
