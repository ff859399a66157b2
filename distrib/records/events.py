"""Run records: what happened in a run, as JSON lines that rank 0 writes and anyone can read back.

Layout (``--log-dir``, by default ``<checkpoint-dir>/logs``; a local path or an fsspec URL)::

    <log-dir>/
      records-20261121T142530.123Z-3fa2c1.jsonl   one file per launch (a "segment")
      records-20261121T143002.871Z-9b01de.jsonl
      tensorboard/events.out.tfevents...          with --tensorboard

Every line is one JSON object with ``kind`` and ``time`` (Unix seconds); non-finite numbers are
written as ``null``. Kinds: ``start`` (step, epoch, world_size, resumed_from, restart), ``resume``
(the marker for an interruption: step resumed from, last_step the interrupted segment reached,
steps_replayed, time_lost_s), ``step`` (step, epoch, train_loss, lr, grad_norm, samples_per_s),
``epoch`` (epoch, step, train/validation loss and metrics, lr, samples_per_s and the
early-stopping state: monitor, best, best_epoch, wait_count, stopped, stop_reason),
``checkpoint`` (step, seconds, bytes, error) and ``end`` (status finished | preempted | failed,
reason, message). Epochs are numbered from 1.

Writing (:class:`RunRecords`): only rank 0 writes; every other rank holds a disabled instance, and
no method contains a collective. Local files are appended line by line (a SIGKILL loses nothing
that was written). Object stores cannot append: the segment is rewritten whole, in a background
thread, at epoch ends, checkpoints and the end, and at most every ``flush_every_s`` seconds
otherwise. Records never break training: every failure is a logged warning.

Reading (:func:`read_history`): segments are replayed in time order; a segment that resumed from
step S supersedes the records of steps after S written before it (they were replayed), so the
history holds each step and epoch once. A ``--force-restart`` segment supersedes everything before it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from distrib.checkpoint.format import InvalidCheckpoint, load_json
from distrib.checkpoint.storage import Storage, open_storage

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"^records-[0-9TZ.]+-[0-9a-f]+\.jsonl$")
TENSORBOARD = "tensorboard"
#: kinds whose records belong to one step of the training trajectory (replayed after a resume)
TRAJECTORY = ("step", "epoch", "checkpoint")


def default_log_dir(checkpoint_dir: str, log_dir: str = "") -> str:
    """``--log-dir``, or ``<checkpoint-dir>/logs`` when it is empty."""
    return log_dir or checkpoint_dir.rstrip("/") + "/logs"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tensors and numpy scalars become floats."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


# ============================================================================ writing


class _Segment:
    """One segment file: appended line by line where the storage can, rewritten whole otherwise."""

    def __init__(self, storage: Storage, name: str, flush_every_s: float) -> None:
        self.storage, self.name, self.flush_every_s = storage, name, flush_every_s
        #: also run after each rewrite, on the same thread (uploads the TensorBoard events)
        self.after_rewrite: Callable[[], None] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False
        self._flushed_at = time.monotonic()
        self._failing = False  # the last write failed (warned once)

    def add(self, line: str, urgent: bool) -> None:
        if self.storage.supports_append:
            self._guard("append", lambda: self.storage.append(self.name, line.encode()))
            return
        with self._lock:
            self.lines.append(line)
        if urgent or time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush(wait=False)

    def flush(self, wait: bool, timeout: float = 20.0) -> None:
        """Rewrite the file with every line so far: in the background, or now when ``wait``."""
        if self.storage.supports_append:
            return
        self._flushed_at = time.monotonic()
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            self._again = running
            if not running and not wait:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="distrib-records")
                self._thread.start()
        if wait:
            if self._thread is not None:
                self._thread.join(timeout)
            self._rewrite()

    def _loop(self) -> None:
        while True:
            self._rewrite()
            with self._lock:  # a flush asked for while this one wrote: write once more
                if not self._again:
                    return
                self._again = False

    def _rewrite(self) -> None:
        with self._lock:
            data = "".join(self.lines).encode()
        self._guard("write", lambda: self.storage.write(self.name, [data]))
        if self.after_rewrite is not None:
            self._guard("write TensorBoard events to", self.after_rewrite)

    def _guard(self, what: str, op: Any) -> None:
        """Run ``op``; a failure is a warning the first time (and again after a success), a
        debug line while it keeps failing, never an exception."""
        try:
            op()
        except Exception as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(level, "run records: cannot %s %s/%s (%s: %s); training goes on", what,
                    self.storage.url, self.name, type(exc).__name__, exc)
        else:
            self._failing = False


class _TensorBoard:
    """The same scalars as TensorBoard events. Remote log dirs get a local staging directory whose
    files are uploaded at every flush (object stores cannot append); the records' background
    writer calls that flush, never the training thread."""

    def __init__(self, storage: Storage, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.storage = storage
        self.local = getattr(storage, "root", None) if storage.supports_append else None
        if self.local is None:
            import tempfile

            self.staging: str | None = tempfile.mkdtemp(prefix="distrib-tb-")
            where = self.staging
        else:
            self.staging, where = None, f"{self.local}/{TENSORBOARD}"
        # purge_step: TensorBoard readers drop events of steps >= it from earlier files, the
        # same rule the records follow for replayed steps
        self.writer = SummaryWriter(where, purge_step=purge_step, flush_secs=30)

    def add(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=int(record["step"]),
                                   walltime=float(record["time"]))

    def flush(self) -> None:
        self.writer.flush()
        if self.staging is not None:
            import os

            for name in os.listdir(self.staging):
                with open(os.path.join(self.staging, name), "rb") as fh:
                    self.storage.write(f"{TENSORBOARD}/{name}", [fh.read()])

    def close(self) -> None:
        try:
            self.writer.close()  # flushes the event file
            self.flush()  # remote: upload it once more
        finally:
            if self.staging is not None:
                import shutil

                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None


def scalars(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The TensorBoard (tag, value) pairs of one record: ``train/loss``, ``epoch/val_loss``,
    ``checkpoint/seconds`` ...; None values are left out."""
    kind = record.get("kind")
    if kind == "step":
        names = {"train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "samples_per_s": "train/samples_per_s"}
    elif kind == "epoch":
        names = {k: f"epoch/{k}" for k in record
                 if k.startswith(("train_", "val_")) or k in ("lr", "samples_per_s", "best")}
    elif kind == "checkpoint":
        names = {"seconds": "checkpoint/seconds", "bytes": "checkpoint/bytes"}
    else:
        return []
    return [(tag, float(record[key])) for key, tag in names.items()
            if isinstance(record.get(key), (int, float)) and not isinstance(record[key], bool)]


class RunRecords:
    """The run's records, written by rank 0 (see the module docstring).

    Build it on every rank with :meth:`open`; on other ranks (and where the log dir cannot be
    opened) it is disabled and every method returns at once. No method raises or blocks on a
    collective; ``samples_per_step`` (global samples per optimizer step) yields samples/s.
    """

    def __init__(self, storage: Storage | None = None, *, tensorboard: bool = False,
                 samples_per_step: int = 0, flush_every_s: float = 30.0) -> None:
        self.storage = storage
        self.enabled = storage is not None
        self.tensorboard = tensorboard
        self.samples_per_step = samples_per_step
        self.flush_every_s = flush_every_s
        self.segment: _Segment | None = None
        self.tb: _TensorBoard | None = None
        self._last: tuple[float, int] | None = None  # (time, step) of the last step record
        #: (seconds, failures) of the earlier launches, read at :meth:`start` (see
        #: :func:`observed_failures`)
        self.observed: tuple[float, int] = (0.0, 0)

    @classmethod
    def open(cls, url: str, options: Mapping[str, Any], *, rank: int, tensorboard: bool,
             samples_per_step: int) -> "RunRecords":
        """Rank 0's records at ``url``; a disabled instance elsewhere or if ``url`` fails."""
        if rank != 0:
            return cls()
        try:
            storage = open_storage(url, options)
            storage.mkdir("")
        except Exception as exc:
            log.warning("run records: cannot open %s (%s: %s); no records are written", url,
                        type(exc).__name__, exc)
            return cls()
        return cls(storage, tensorboard=tensorboard, samples_per_step=samples_per_step)

    # ------------------------------------------------------------------ events

    def start(self, *, step: int, epoch: int, world_size: int, resumed_from: str | None,
              restart: bool, heartbeat: Mapping[str, Any] | None = None
              ) -> dict[str, Any] | None:
        """Open this launch's segment. On a resume (or a fresh start after an interruption)
        also write the ``resume`` marker: how far the previous segment got (its last record, or
        the checkpoint heartbeat ``heartbeat`` if that got further) and the time lost since.
        Returns that marker (None when there is none, or records are off). ``epoch`` counts
        from 1 (the epoch the run continues in)."""
        if self.storage is None:
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        name = f"records-{now.strftime('%Y%m%dT%H%M%S.%f')[:-3]}Z-{uuid.uuid4().hex[:6]}.jsonl"
        previous = None if restart else self._previous_tail()
        self.segment = _Segment(self.storage, name, self.flush_every_s)
        if self.tensorboard:
            try:
                self.tb = _TensorBoard(self.storage, purge_step=step + 1 if step else None)
                if self.tb.staging is not None:  # uploads go with the background rewrites
                    self.segment.after_rewrite = self.tb.flush
            except Exception as exc:
                log.warning("run records: no TensorBoard events (%s: %s)", type(exc).__name__,
                            exc)
        self._last = (time.time(), step)
        self._write({"kind": "start", "step": step, "epoch": epoch, "world_size": world_size,
                     "resumed_from": resumed_from, "restart": restart}, urgent=True)
        if previous is None:
            return None
        marker = resume_marker(previous, step, heartbeat)
        self._write(marker, urgent=True)
        return marker

    def _previous_tail(self) -> dict[str, Any] | None:
        """The last record of the newest earlier segment, with ``last_step``: the highest step
        it recorded."""
        assert self.storage is not None
        try:
            segments = read_segments(self.storage)
        except Exception as exc:
            log.warning("run records: cannot read the earlier records (%s: %s)",
                        type(exc).__name__, exc)
            return None
        self.observed = observed_failures(segments)
        if not segments:
            return None
        records = segments[-1]
        steps = [int(r["step"]) for r in records if isinstance(r.get("step"), int)]
        return {**records[-1], "last_step": max(steps, default=0)}

    def step(self, step: int, epoch: int, train_loss: float, lr: float,
             grad_norm: float | None) -> None:
        """A logged optimizer step (``epoch`` counts from 0, as the trainer does)."""
        if self.storage is None:
            return
        now = time.time()
        rate = None
        if self._last is not None and now > self._last[0]:
            rate = (step - self._last[1]) * self.samples_per_step / (now - self._last[0])
        self._last = (now, step)
        self._write({"kind": "step", "step": step, "epoch": epoch + 1, "train_loss": train_loss,
                     "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate})

    def metrics(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """A ``step`` record of any values a loop logs (``epoch`` counts from 1)."""
        if self.storage is None:
            return
        self._write({"kind": "step", "step": step, "epoch": epoch, **values})

    def epoch(self, metrics: Mapping[str, float], early_stopping: Any) -> None:
        """An epoch's reduced metrics (as the trainer logs them) and the early-stopping state."""
        if self.storage is None:
            return
        es = early_stopping
        best_epoch = None if es.best_epoch is None else es.best_epoch + 1
        record = {"kind": "epoch", **{k: v for k, v in metrics.items()},
                  "epoch": int(metrics["epoch"]), "step": int(metrics["step"]),
                  "monitor": es.monitor, "mode": es.mode,
                  "best": es.best if best_epoch is not None else None, "best_epoch": best_epoch,
                  "wait_count": es.wait_count, "stopped": es.stopped, "stop_reason": es.reason}
        self._write(record, urgent=True)

    def checkpoint(self, step: int, seconds: float, nbytes: int,
                   error: BaseException | None) -> None:
        """A save finished: committed (``error`` None) or failed. Called where the
        :class:`~distrib.checkpoint.checkpointer.Checkpointer` observes the commit."""
        if self.storage is None:
            return
        self._write({"kind": "checkpoint", "step": step, "seconds": seconds, "bytes": nbytes,
                     "error": None if error is None else f"{type(error).__name__}: {error}"},
                    urgent=True)

    def end(self, status: str, *, step: int, epoch: int, reason: str | None = None,
            message: str = "") -> None:
        """The run ends here (``finished``, ``preempted`` or ``failed``): write, flush, close.
        ``epoch`` counts from 1: the epoch in progress, or the one just completed."""
        if self.storage is None or self.segment is None:
            return
        self._write({"kind": "end", "status": status, "step": step, "epoch": epoch,
                     "reason": reason, "message": message})
        self.close()

    def close(self) -> None:
        """Flush and close (waits for the background writer; idempotent)."""
        if self.segment is None:
            return
        segment, self.segment = self.segment, None
        segment.flush(wait=True)
        segment.after_rewrite = None
        if self.tb is not None:
            tb, self.tb = self.tb, None
            segment._guard("write TensorBoard events to", tb.close)

    def _write(self, record: dict[str, Any], urgent: bool = False) -> None:
        if self.segment is None:
            return
        record = _clean({"kind": record["kind"], "time": time.time(),
                         **{k: v for k, v in record.items() if k != "kind"}})
        self.segment.add(json.dumps(record, allow_nan=False) + "\n", urgent)
        if self.tb is not None:
            tb = self.tb
            self.segment._guard("write TensorBoard events to", lambda: tb.add(record))
            if urgent and self.tb.staging is None:  # local: flushing the event file is cheap
                self.segment._guard("write TensorBoard events to", tb.flush)
            # remote: the segment's background rewrite, which urgent records trigger, uploads


def observed_failures(segments: Sequence[list[dict[str, Any]]]) -> tuple[float, int]:
    """(seconds the launches of ``segments`` ran, how many of them ended in a failure that loses
    work: killed without a word, or ``failed``; a preemption with notice loses nothing)."""
    seconds, failures = 0.0, 0
    for records in segments:
        seconds += max(0.0, float(records[-1]["time"]) - float(records[0]["time"]))
        last = records[-1]
        if not (last["kind"] == "end" and last.get("status") in ("finished", "preempted")):
            failures += 1
    return seconds, failures


def estimate_mtbf(observed: tuple[float, int], given_seconds: float) -> float:
    """The expected time between failures: the run's observed record with the given value
    counted as one more interval, ``(seconds + given) / (failures + 1)`` (the given value alone
    when nothing was observed; it moves toward the observed rate as failures accumulate)."""
    seconds, failures = observed
    return (max(0.0, seconds) + given_seconds) / (max(0, failures) + 1)


def resume_marker(previous: Mapping[str, Any], step: int,
                  heartbeat: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``resume`` record: resumed at ``step`` after ``previous`` (the last record of the
    interrupted segment, with its ``last_step``). The checkpoint heartbeat may know a later step."""
    last_step, last_time = int(previous["last_step"]), float(previous["time"])
    beat = dict(heartbeat or {})
    if isinstance(beat.get("step"), int) and beat["step"] > last_step:
        last_step, last_time = int(beat["step"]), max(last_time, float(beat.get("time", 0)))
    return {"kind": "resume", "step": step, "last_step": last_step,
            "steps_replayed": max(0, last_step - step),
            "time_lost_s": max(0.0, time.time() - last_time),
            "previous_status": previous.get("status") if previous.get("kind") == "end" else None}


# ============================================================================ reading


def segment_names(storage: Storage) -> list[str]:
    """The segment files in a log dir, oldest first (names start with their UTC start time)."""
    return sorted(n for n in storage.list("") if SEGMENT_RE.match(n))


def parse_segment(data: bytes) -> list[dict[str, Any]]:
    """The records of one segment. A line cut short by a crash, or one that is not a record as
    :func:`valid_record` defines it (a segment is read from storage: untrusted), is skipped."""
    records = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = load_json(line.encode(), "record", MAX_RECORD_BYTES, max_depth=2)
        except InvalidCheckpoint:
            continue
        if valid_record(record):
            records.append(record)
    return records


#: integer fields of records, where present
_COUNTS = ("step", "epoch", "world_size", "last_step", "steps_replayed", "bytes", "best_epoch",
           "wait_count")
MAX_RECORD_BYTES = 1 << 16
MAX_SEGMENT_BYTES = 1 << 28


def valid_record(record: Any) -> bool:
    """A flat JSON object with a string ``kind``, a finite ``time``, non-negative integer counts
    and otherwise only strings, finite numbers, booleans and nulls."""
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return False
    when = record.get("time")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        return False
    for key, value in record.items():
        if key in _COUNTS and value is not None and (
                type(value) is not int or value < 0):
            return False
        if isinstance(value, (dict, list)) or (isinstance(value, float) and
                                                not math.isfinite(value)):
            return False
    return True


def read_segments(storage: Storage) -> list[list[dict[str, Any]]]:
    """Every non-empty segment's records, oldest segment first (by its first record's time;
    names only break ties)."""
    out = [parse_segment(storage.read(name, limit=MAX_SEGMENT_BYTES))
           for name in segment_names(storage)]
    return sorted((records for records in out if records), key=lambda r: float(r[0]["time"]))


@dataclass
class History:
    """One consistent history of a run, merged from its segments."""

    records: list[dict[str, Any]] = field(default_factory=list)  # each step/epoch once, in order
    superseded: list[dict[str, Any]] = field(default_factory=list)  # replayed after a resume
    segments: int = 0

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    @property
    def status(self) -> str:
        """``finished``, ``preempted`` or ``failed`` when the last launch said so; otherwise
        ``unfinished``: still running, or killed without a word."""
        last = self.records[-1] if self.records else {}
        return str(last.get("status")) if last.get("kind") == "end" else "unfinished"


def merge(segments: Iterable[list[dict[str, Any]]]) -> History:
    """Replay segments in order: a segment starting at step S supersedes the earlier segments'
    trajectory records (steps, epochs, checkpoints) of steps after S; a restart supersedes all."""
    history = History()
    for records in segments:
        history.segments += 1
        start = next((r for r in records if r["kind"] == "start"), None)
        if start is not None and start.get("restart"):
            history.superseded += history.records
            history.records = []
        elif start is not None:
            resumed = int(start.get("step") or 0)
            replayed = [r["kind"] in TRAJECTORY and int(r.get("step") or 0) > resumed
                        for r in history.records]
            history.superseded += [r for r, gone in zip(history.records, replayed) if gone]
            history.records = [r for r, gone in zip(history.records, replayed) if not gone]
        history.records += records
    return history


def read_history(storage: Storage) -> History:
    """The merged history of the log dir behind ``storage``."""
    return merge(read_segments(storage))
