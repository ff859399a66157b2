"""A rank whose data-loader workers get a SIGTERM to the rank's process group at the worst
moment: right after the fork, before they could leave the group (``python tests/signal_window.py
[plain]``; ``plain`` starts workers without distrib's worker context). Prints a JSON line: the
items read, whether the rank saw the notice, or the error."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from distrib.runtime.preemption import PreemptionHandler, detach_worker_process, worker_context  # noqa: E402


def early_signal(worker_id: int) -> None:
    """The notice reaches the rank's group before the worker has detached from it."""
    if worker_id == 0:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    detach_worker_process()


def main() -> None:
    os.setpgid(0, 0)  # this script's group stands for the rank's (torchrun signals the group)
    handler = PreemptionHandler().install()
    context: Any = None if sys.argv[1:] == ["plain"] else worker_context()
    loader = DataLoader(torch.arange(64), batch_size=8, num_workers=2,
                        worker_init_fn=early_signal, multiprocessing_context=context)
    try:
        items = sum(len(batch) for batch in loader)
        print(json.dumps({"items": items, "notice": handler.requested}))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "notice": handler.requested}))


if __name__ == "__main__":
    main()
