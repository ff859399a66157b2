"""Logging with the rank in every line, and a progress bar that only rank 0 draws.

Rank 0 logs at the configured level (INFO by default); other ranks log warnings and errors only,
so a job with eight ranks prints one story, not eight.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

_HANDLER_NAME = "distrib"


def setup_logging(rank: int | None = None, level: str = "info") -> None:
    """Send ``distrib.*`` loggers to stderr as ``[rank N] LEVEL name: message``: ``level`` on
    rank 0, warnings on the others, not propagated to the root logger. The command line calls
    it; library use calls it explicitly or not at all. ``rank`` defaults to ``$RANK`` (0).

    Idempotent: calling it again replaces the handler.
    """
    if rank is None:
        raw = os.environ.get("RANK", "0")
        rank = int(raw) if raw.isdigit() else 0
    logger = logging.getLogger("distrib")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    logger.propagate = False


def progress_enabled(requested: bool, rank: int) -> bool:
    """A bar is drawn only on rank 0, when asked for, and when stdout and stderr are terminals."""
    return requested and rank == 0 and sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """A tqdm bar over an epoch's batches when enabled, a plain pass-through otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def wrap(self, items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        try:  # log lines go through tqdm.write, above the bar, instead of over it
            with logging_redirect_tqdm(loggers=[logging.getLogger("distrib")]):
                yield from self._bar
        finally:
            self._bar.close()
            self._bar = None

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
