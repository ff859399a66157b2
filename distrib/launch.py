"""``python -m distrib.launch``: torchrun, with exit codes a scheduler can act on.

Usage is torchrun's own (every option is passed through)::

    python -m distrib.launch --nproc_per_node=8 [--nnodes ... --rdzv-...] -m distrib.train [ARGS]

torchrun exits 1 whenever a worker fails or torchrun itself is signalled, whatever the workers
returned, so a Kubernetes ``podFailurePolicy`` cannot tell "preempted, retry" from "bad
configuration, stop". This wrapper:

1. checks the training arguments first (``distrib.train --check-config``): a bad flag, task or
   URL exits 2 before any worker starts, instead of being retried ``--max-restarts`` times;
2. runs torchrun in this process, which passes SIGTERM, SIGINT and SIGUSR1 (SLURM's "time is
   nearly up") on to its workers;
3. exits with the workers' own code (:mod:`distrib.exitcodes`): 2 if any worker reported a
   permanent error, 75 if they were preempted (without torchrun's traceback, which would only
   repeat what the workers logged), else 1 with one line saying what failed;
4. sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun unless it is set already: when
   torchrun shares its rendezvous store with the workers, restarted workers can read the
   previous round's addresses and fail to connect (pytorch/pytorch#135712); and has torchrun
   handle SIGUSR1 too (``PET_SIGNALS_TO_HANDLE``), which SLURM sends to every process of a job
   step and which would otherwise kill torchrun itself.

Workers report through files in ``$DISTRIB_STATUS_DIR`` (a temporary directory this wrapper
creates). Only ``-m distrib.train`` gets the pre-check; another entry point still gets the
signal forwarding and the status mapping if it calls :func:`distrib.train.main`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

from distrib import exitcodes

PROG = "python -m distrib.launch"


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun options ending with the entry point, the entry point's own arguments)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv):
            return argv[: i + 2], argv[i + 2:]
        if not arg.startswith("-") and (i == 0 or not _takes_value(argv[i - 1])):
            return argv[: i + 1], argv[i + 1:]
    return argv, []


def _takes_value(flag: str) -> bool:
    """Whether a torchrun flag is followed by its value as a separate argument."""
    switches = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path",
                "--module", "-m"}
    return flag.startswith("-") and "=" not in flag and flag not in switches


def worker_code(status_dir: str) -> int | None:
    """The most telling exit code the workers reported: permanent, then preempted, then any."""
    codes = []
    for name in os.listdir(status_dir):
        try:
            with open(os.path.join(status_dir, name)) as fh:
                codes.append(int(fh.read().strip()))
        except (OSError, ValueError):
            continue
    for wanted in (exitcodes.PERMANENT, exitcodes.PREEMPTED, exitcodes.FAILURE):
        if wanted in codes:
            return wanted
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    torchrun_args, script_args = split_args(argv)
    if torchrun_args[-2:] == ["-m", "distrib.train"]:
        check = subprocess.run([sys.executable, "-m", "distrib.train", *script_args,
                                "--check-config"], stdout=subprocess.DEVNULL)
        if check.returncode != 0:
            return exitcodes.PERMANENT if check.returncode == 2 else check.returncode
    with tempfile.TemporaryDirectory(prefix="distrib-status-") as status_dir:
        os.environ["DISTRIB_STATUS_DIR"] = status_dir
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the docstring
        os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
        print(f"{PROG}: torchrun {' '.join(argv)}", file=sys.stderr, flush=True)
        # a torch that ignores PET_SIGNALS_TO_HANDLE keeps this: SIGUSR1 becomes a SIGTERM
        signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
        try:
            _torchrun(argv)
        except SystemExit as exc:  # torchrun's own argument errors
            return exc.code if isinstance(exc.code, int) else exitcodes.FAILURE
        except Exception as exc:  # workers failed, a signal, a rendezvous error
            reported = worker_code(status_dir)
            if reported in (exitcodes.PREEMPTED, exitcodes.PERMANENT):
                return reported  # the workers said why; torchrun's report would only repeat it
            print(f"{PROG}: {_describe(exc)}", file=sys.stderr, flush=True)
            return reported if reported is not None else exitcodes.FAILURE
        return exitcodes.OK


def _torchrun(argv: list[str]) -> None:
    """torchrun in this process, so that its failure is an exception to map, not a 30-line
    traceback at exit (it installs its own handlers for SIGTERM, SIGINT and the like, and
    passes them on to the workers)."""
    from torch.distributed.run import parse_args, run

    run(parse_args(argv))  # type: ignore[no-untyped-call]


def _describe(exc: BaseException) -> str:
    """torchrun's failure in one line: which workers failed how, or the error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = [f"rank {rank} exited with {getattr(f, 'exitcode', '?')}"
                 for rank, f in sorted(failures.items())]
        return "workers failed: " + ", ".join(parts)
    text = " ".join(str(exc).split())
    return f"torchrun failed: {type(exc).__name__}: {text[:300]}"


def cli() -> None:
    """The ``distrib-launch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
