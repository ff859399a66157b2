"""Jobs that run beside the benchmark (figures 10-12): a launcher command in a session of its
own with its output in a file, watched by polling, always SIGKILLed with its workers and waited
for; and the folder the memory tier writes to."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Callable

from distrib.bench.core import Settings
from distrib.bench.jobs import _kill_job, job_env, torchrun
from distrib.checkpoint.memory import DEFAULT_DIR
from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointInfo, CheckpointStore


def memory_root(settings: Settings) -> str:
    """A new folder where the memory tier writes (``/dev/shm``, else the scratch folder); the
    caller removes it."""
    where = DEFAULT_DIR if os.path.isdir(DEFAULT_DIR) else settings.workdir
    return tempfile.mkdtemp(prefix=".distrib-bench-", dir=where)


def restart_env(**extra: str) -> dict[str, str]:
    """:func:`~distrib.bench.jobs.job_env` for a job whose workers get restarted: each
    rendezvous round gets a fresh store, else the restarted workers may read the previous
    round's addresses and fail to connect (pytorch/pytorch#135712; ``python -m distrib.launch``
    sets the same)."""
    return dict(job_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)


class Job:
    """A launcher command (``torchrun ...``) started in a session of its own, its output in
    ``log``; :meth:`kill` SIGKILLs it with its workers and waits for them."""

    def __init__(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(cmd, env=env or job_env(), stdout=fh,
                                         stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)

    def text(self) -> str:
        with open(self.log, errors="replace") as fh:
            return fh.read()

    def fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"{why}; job output:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        _kill_job(self.proc)


def wait_for(condition: Callable[[], bool], job: Job, timeout: float, what: str) -> None:
    """Poll ``condition()`` every 10 ms until it holds; RuntimeError (with the job's output) on
    timeout, or if the job ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = job.proc.poll() is not None
        if ended or time.monotonic() > deadline:
            raise job.fail(f"{what}: {'the job ended' if ended else 'timed out'}")
        time.sleep(0.01)


def prepared_checkpoint(flags: list[str], url: str, log: str, env: dict[str, str] | None = None,
                        timeout: float = 900) -> tuple[CheckpointStore, CheckpointInfo]:
    """Train one step of ``python -m distrib.train FLAGS`` into ``url`` and leave its checkpoint
    as an interrupted run's (the COMPLETE marker removed, so a relaunch resumes it). Returns
    the store and the checkpoint; raises with the job's output if there is none."""
    prepare = Job(torchrun("-m", "distrib.train", *flags, "--checkpoint-dir", url,
                           "--max-steps", "1"), log, env)
    try:  # a timeout must not leave the workers running: Job.kill gets them too
        code = prepare.proc.wait(timeout)
    finally:
        prepare.kill()
    store = CheckpointStore(open_storage(url))
    info = store.latest()
    if code != 0 or info is None:
        raise prepare.fail(f"writing the checkpoint to {url} failed")
    store.clear_complete()  # a finished run would not resume: make it an interrupted one
    return store, info
