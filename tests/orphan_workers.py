"""How a rank's data-loader workers end when the rank is SIGKILLed: ``python
tests/orphan_workers.py [plain]`` (``plain``: torch's own worker setup, without distrib's
``detach_worker_process``; its workers may take seconds to end, or longer). Prints a JSON list, one entry per worker: ``"signal 9"`` if the
kernel killed it with its rank, ``"exit N"`` if it ended by itself (torch's watchdog notices an
orphaned worker within 5 s, and until then it holds copies of the rank's sockets)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RANK = """
import json, sys, time
import torch
from torch.utils.data import DataLoader
from distrib.runtime.preemption import detach_worker_process, worker_context
plain = sys.argv[1:] == ["plain"]
loader = DataLoader(torch.arange(64), batch_size=8, num_workers=2, persistent_workers=True,
                    worker_init_fn=None if plain else lambda _: detach_worker_process(),
                    multiprocessing_context=None if plain else worker_context())
batches = iter(loader)
next(batches), next(batches)  # one batch from each worker: both have run their worker_init_fn
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
    os.kill(rank.pid, signal.SIGKILL)
    rank.wait()
    ended = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        ended.append(f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                     else f"exit {os.WEXITSTATUS(status)}")
    print(json.dumps(ended))


if __name__ == "__main__":
    main()
