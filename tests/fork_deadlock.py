"""A rank whose first data-loader worker deadlocks inside ``os.fork()`` (as CPython before 3.12
can, python/cpython#112275), simulated by an at-fork hook that blocks the first child forever
(``python tests/fork_deadlock.py [plain]``; ``plain`` starts workers without distrib's worker
context, and gives up after 10 s). Prints a JSON line: the items read, or the error."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from distrib.runtime import preemption  # noqa: E402

MARKER = Path(tempfile.mkdtemp()) / "first-fork-done"


def stuck_first_child() -> None:
    if not MARKER.exists():
        MARKER.touch()
        threading.Event().wait()  # never returns: this child never reaches Python code


def detach(worker_id: int) -> None:
    preemption.detach_worker_process()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    preemption.WORKER_START_TIMEOUT_S = 1.0
    os.register_at_fork(after_in_child=stuck_first_child)
    context: Any = None if sys.argv[1:] == ["plain"] else preemption.worker_context()
    loader = DataLoader(torch.arange(64), batch_size=8, num_workers=2, timeout=10,
                        worker_init_fn=detach,
                        multiprocessing_context=context)
    try:
        print(json.dumps({"items": sum(len(batch) for batch in loader)}))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))


if __name__ == "__main__":
    main()
