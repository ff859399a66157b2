"""``python -m distrib.report RUN_DIR [--out report.png]``: one picture and a short summary of a run.

RUN_DIR is the log dir (``--log-dir``) or the checkpoint dir whose ``logs/`` holds the records, a
local path or an fsspec URL. It reads the merged history (:func:`distrib.records.events.read_history`), so
it works on a finished run, an interrupted one and one still in progress. The PNG (matplotlib,
Agg backend, no display) shows loss per epoch with the best and the early-stopping epoch, the
learning rate, and a time axis with checkpoint saves, interruptions and resumes.

The summary needs nothing beyond distrib; the picture needs matplotlib (``--no-plot`` skips it).

Exit codes: 0 done; 2 bad input (no records there, bad URL, an --out that is not a writable
.png path) or matplotlib missing (after the summary is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from distrib.checkpoint.storage import Storage, open_storage, parse_options
from distrib.config import parse_key_value
from distrib.records.events import History, read_history, segment_names

PROG = "python -m distrib.report"
RECENT_S = 120.0  # a run whose last record is younger than this may still be running


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def find_records(url: str, options: dict[str, Any]) -> Storage:
    """The log dir for RUN_DIR ``url``: itself if it holds records, else its ``logs/``."""
    try:
        candidates = [open_storage(url, options), open_storage(url.rstrip("/") + "/logs", options)]
        for storage in candidates:
            if segment_names(storage):
                return storage
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise UsageError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not candidates[0].exists(""):
        raise UsageError(f"{candidates[0].url}: no such directory")
    raise UsageError(f"{candidates[0].url}: no run records here or in its logs/ "
                     "(records-*.jsonl, written by distrib.train)")


@dataclass
class Summary:
    """What the report says in words."""

    status: str  # finished | preempted | failed | in progress | interrupted
    epochs: int
    steps: int
    monitor: str | None
    best: float | None
    best_epoch: int | None
    stopped_epoch: int | None
    stop_reason: str
    interruptions: int
    steps_replayed: int
    time_lost_s: float
    saves: int
    failed_saves: int
    saving_s: float

    def lines(self) -> list[str]:
        best = (f"best {self.monitor} {self.best:.4g} at epoch {self.best_epoch}"
                if self.best is not None else "no best value yet")
        saves = f"{self.saves} checkpoint saves, {self.saving_s:.1f}s spent saving"
        return [f"status: {self.status}",
                f"epochs: {self.epochs} ({self.steps} optimizer steps); {best}",
                f"stop reason: {self.stop_reason or '-'}",
                f"interruptions survived: {self.interruptions} ({self.steps_replayed} steps "
                f"replayed, {self.time_lost_s:.1f}s lost)",
                saves + (f" ({self.failed_saves} failed)" if self.failed_saves else "")]


def summarize(history: History, now: float | None = None) -> Summary:
    """The summary of a merged history."""
    epochs, ends = history.kind("epoch"), history.kind("end")
    last_epoch = epochs[-1] if epochs else {}
    status = history.status
    if status == "unfinished":
        age = (now or time.time()) - float(history.records[-1]["time"]) if history.records else 0
        status = "in progress" if age < RECENT_S else "interrupted"
    stopped = next((e for e in epochs if e.get("stopped")), None)
    reason = str(ends[-1].get("message") or ends[-1].get("reason") or "") if ends else ""
    resumes = history.kind("resume")
    saves = [r for r in history.records + history.superseded if r["kind"] == "checkpoint"]
    steps = [int(r["step"]) for r in history.records if isinstance(r.get("step"), int)]
    return Summary(
        status=status, epochs=int(last_epoch.get("epoch", 0)), steps=max(steps, default=0),
        monitor=last_epoch.get("monitor"), best=last_epoch.get("best"),
        best_epoch=last_epoch.get("best_epoch"),
        stopped_epoch=None if stopped is None else int(stopped["epoch"]),
        stop_reason=reason or (stopped or {}).get("stop_reason") or "",
        interruptions=len(resumes),
        steps_replayed=sum(int(r.get("steps_replayed") or 0) for r in resumes),
        time_lost_s=sum(float(r.get("time_lost_s") or 0) for r in resumes),
        saves=sum(1 for s in saves if not s.get("error")),
        failed_saves=sum(1 for s in saves if s.get("error")),
        saving_s=sum(float(s.get("seconds") or 0) for s in saves))


def _check_out(out: str) -> None:
    """The picture's path must name a .png file in a writable directory."""
    if not out.lower().endswith(".png") or os.path.basename(out).lower() == ".png":
        raise UsageError(f"--out {out!r}: the picture must be a file name ending in .png")
    if os.path.isdir(out):
        raise UsageError(f"--out {out}: is a directory; give a file name ending in .png")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the log dir or the checkpoint dir")
    parser.add_argument("--out", default="report.png", help="the PNG to write (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true",
                        help="print the summary only (no matplotlib needed)")
    parser.add_argument("--storage-option", type=parse_key_value, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="an fsspec storage option (repeatable)")
    args = parser.parse_args(argv)
    try:
        if not args.no_plot:
            _check_out(args.out)
        options = parse_options(dict(args.storage_option))
        storage = find_records(args.run_dir, options)
        history = read_history(storage)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # storage trouble while reading the records: one line
        print(f"{PROG}: error: {args.run_dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = summarize(history)
    print(f"run records: {storage.url} ({history.segments} segment(s))")
    for line in summary.lines():
        print(line)
    sys.stdout.flush()
    if args.no_plot:
        return 0
    if importlib.util.find_spec("matplotlib") is None:
        print(f"{PROG}: error: the picture needs matplotlib, which is not installed (pip install "
              "'distrib[plot]'; or --no-plot for the summary only)", file=sys.stderr)
        return 2
    from distrib.records.plot import draw

    try:
        width, height = draw(history, summary, args.out, title=storage.url)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
