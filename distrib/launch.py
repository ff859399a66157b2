"""``python -m distrib.launch``: torchrun, with exit codes a scheduler can act on.

Usage is torchrun's own (every option is passed through)::

    python -m distrib.launch --nproc_per_node=8 [--nnodes ... --rdzv-...] -m distrib.train [ARGS]

torchrun exits 1 whenever a worker fails or torchrun itself is signalled, whatever the workers
returned, so a Kubernetes ``podFailurePolicy`` cannot tell "preempted, retry" from "bad
configuration, stop". This wrapper:

1. checks the training arguments first (``distrib.train --check-config``): a bad flag, task or
   URL exits 2 before any worker starts, instead of being retried ``--max-restarts`` times;
2. runs torchrun as a child and forwards SIGTERM, SIGINT and SIGUSR1 to it (SIGUSR1, SLURM's
   "time is nearly up", is forwarded as SIGTERM, which torchrun passes on to its workers);
3. exits with the workers' own code (:mod:`distrib.exitcodes`): 2 if any worker reported a
   permanent error, 75 if they were preempted, else torchrun's code;
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
        env = dict(os.environ, DISTRIB_STATUS_DIR=status_dir)
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see torchrun_env_problem()
        # SLURM signals the whole job step, torchrun included: without a handler SIGUSR1 would
        # kill torchrun; with one it is passed on to the workers like SIGTERM
        env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv]
        print(f"{PROG}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        child = subprocess.Popen(cmd, env=env)

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, forward)
        rc = child.wait()
        if rc == 0:
            return exitcodes.OK
        reported = worker_code(status_dir)
        return reported if reported is not None else (rc if rc > 0 else exitcodes.FAILURE)


def cli() -> None:
    """The ``distrib-launch`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
