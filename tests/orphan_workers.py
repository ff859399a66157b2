"""How a rank's data-loader workers end when the rank is SIGKILLed: ``python
tests/orphan_workers.py [plain|early]`` (``plain``: torch's own worker setup, without distrib's
``detach_worker_process``; its workers may take seconds to end, or longer. ``early``: distrib's,
with the rank killed while each worker is stopped before its ``worker_init_fn``). Prints a JSON
list, one entry per worker: ``"signal 9"`` if the kernel killed it with its rank, ``"exit N"`` if
it ended by itself (torch's watchdog notices an orphaned worker within 5 s, and until then it
holds copies of the rank's sockets), ``"alive"`` if it still ran 20 s after its rank's death."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RANK = """
import json, os, signal, sys, time
import torch
from torch.utils.data import DataLoader
from distrib.runtime.preemption import detach_worker_process, worker_context
plain, early = sys.argv[1:] == ["plain"], sys.argv[1:] == ["early"]
def init(_: int) -> None:
    if early:  # the rank dies while the worker is here: before it could detach
        os.kill(os.getpid(), signal.SIGSTOP)
    detach_worker_process()
loader = DataLoader(torch.arange(64), batch_size=8, num_workers=2, persistent_workers=True,
                    worker_init_fn=None if plain else init,
                    multiprocessing_context=None if plain else worker_context())
batches = iter(loader)
if not early:
    next(batches), next(batches)  # a batch from each worker: both have run their worker_init_fn
print(json.dumps([w.pid for w in batches._workers]), flush=True)
time.sleep(600)
"""


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # orphans become this process's children, so that it can see how each one ended
    assert libc.prctl(36, 1, 0, 0, 0) == 0, "PR_SET_CHILD_SUBREAPER failed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rank = subprocess.Popen([sys.executable, "-c", RANK, *sys.argv[1:]], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert rank.stdout is not None
    pids = json.loads(rank.stdout.readline())
    while sys.argv[1:] == ["early"] and not all(_stopped(pid) for pid in pids):
        time.sleep(0.01)
    os.kill(rank.pid, signal.SIGKILL)
    rank.wait()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    ended, deadline = [], time.monotonic() + 20
    for pid in pids:
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            ended.append("alive")
        else:
            status = done[1]
            ended.append(f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                         else f"exit {os.WEXITSTATUS(status)}")
    print(json.dumps(ended))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


if __name__ == "__main__":
    main()
