"""A run's lease on its checkpoint directory: one job writes there at a time.

The lease is a small JSON file ``lease-<generation>.json`` in the checkpoint root, naming its
holder (a run identity, host, process, start time) and a heartbeat time that the holder rewrites
every quarter of the timeout. The highest generation is the current lease. Taking the lease means
creating the next generation with a create-only write (``O_EXCL`` locally, ``If-None-Match: *`` on
S3), so of two jobs that try at once exactly one gets it.

A lease can be taken over when its holder is

* the same run (the same :func:`run_identity`: a worker group that torchrun restarted, a
  Kubernetes pod of the same Job, a requeued SLURM job) — at once;
* gone: a process of this host that no longer exists — at once; or a heartbeat older than the
  timeout — with a warning;
* released (the file was deleted when the holder ended).

Otherwise the newcomer waits while the heartbeat stays still (the holder may have just died),
up to one timeout, and gives up at once when the heartbeat moves: :class:`LeaseHeld`, whose
message names the holder. A holder that finds a higher generation than its own has lost the
lease (it stalled past the timeout and another job took over) and must stop writing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from distrib.checkpoint.format import MAX_MARKER_BYTES, InvalidCheckpoint, parse_marker
from distrib.checkpoint.storage import Storage, UnsafePath

log = logging.getLogger(__name__)

LEASE_RE = re.compile(r"^lease-(\d{9})\.json$")
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run_id": str, "host": str, "pid": int, "started": (int, float),
    "heartbeat": (int, float), "timeout": (int, float)}


def run_identity(env: dict[str, str] | None = None) -> str:
    """What makes two launches "the same run": ``DISTRIB_RUN_ID`` if set (the Kubernetes
    manifests set the Job's UID), else torchrun's run id (``--rdzv-id``, or the id
    ``--standalone`` makes up, the same across restarts of the worker group), else SLURM's job id;
    otherwise a new identity for this process."""
    env = dict(os.environ) if env is None else env
    for var in ("DISTRIB_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = env.get(var, "")
        if value and value != "none":
            return f"{var}={value}"[:200]
    return f"process-{uuid.uuid4().hex[:12]}"


class LeaseHeld(RuntimeError):
    """Another live run holds the directory; the message is one line naming it."""


@dataclass(frozen=True)
class Holder:
    """What a lease file says."""

    generation: int
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    timeout: float

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, heartbeat "
                f"{max(0.0, now - self.heartbeat):.0f}s ago)")


def _file(generation: int) -> str:
    return f"lease-{generation:09d}.json"


class Lease:
    """This run's lease on ``storage``'s root (rank 0 holds it). See the module docstring.

    Args:
        storage: the checkpoint root.
        run_id: this run's identity (:func:`run_identity`).
        timeout_s: a heartbeat older than this makes the lease stale.
    """

    def __init__(self, storage: Storage, run_id: str, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.clock = clock
        self.generation: int | None = None
        self.lost = False
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting_logged = False

    # ------------------------------------------------------------------ reading

    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(LEASE_RE.match, self.storage.list(""))
                      if m is not None)

    def holder(self, generation: int) -> Holder | None:
        """The holder written in ``generation``; None if it is gone or unreadable (a damaged
        lease protects nothing: it is replaced, with a warning)."""
        try:
            raw = parse_marker(self.storage.read(_file(generation), limit=MAX_MARKER_BYTES),
                               "lease", _FIELDS)
            return Holder(generation, str(raw["run_id"]), str(raw["host"]), int(raw["pid"]),
                          float(raw["started"]), float(raw["heartbeat"]),
                          float(raw["timeout"]))
        except FileNotFoundError:
            return None
        except (InvalidCheckpoint, UnsafePath, IsADirectoryError, KeyError) as exc:
            log.warning("ignoring the unreadable lease %s/%s (%s)", self.storage.url,
                        _file(generation), exc)
            return None

    # ------------------------------------------------------------------ taking

    def acquire(self) -> None:
        """Take the lease (see the module docstring); LeaseHeld if a live run holds it."""
        first_seen: dict[int, float] = {}
        deadline = self.clock() + self.timeout_s
        while True:
            gens = self.generations()
            top = gens[-1] if gens else 0
            current = self.holder(top) if top else None
            if current is not None and not self._can_take(current, first_seen, deadline):
                time.sleep(min(1.0, max(0.05, self.timeout_s / 20)))
                continue
            try:
                self.storage.write_new(_file(top + 1), self._content())
            except FileExistsError:
                continue  # another job took that generation first: look again
            self.generation = top + 1
            break
        for old in gens:
            try:
                self.storage.delete(_file(old))
            except Exception as exc:  # a leftover is harmless: the highest generation counts
                log.debug("could not delete an old lease: %s", exc)

    def _can_take(self, current: Holder, first_seen: dict[int, float], deadline: float) -> bool:
        now = self.clock()
        if current.run_id == self.run_id:
            log.info("taking over the lease of an earlier attempt of this run (%s)",
                     current.describe(now))
            return True
        if current.host == socket.gethostname() and not _alive(current.pid):
            log.warning("taking over the lease of %s: that process is gone",
                        current.describe(now))
            return True
        if now - current.heartbeat > max(current.timeout, self.timeout_s):
            log.warning("taking over the stale lease of %s", current.describe(now))
            return True
        seen = first_seen.setdefault(current.generation, current.heartbeat)
        if current.heartbeat > seen or now > deadline:
            raise LeaseHeld(f"{self.storage.url} is in use by {current.describe(now)}; wait for "
                            "it to finish, or use another --checkpoint-dir")
        if not self._waiting_logged:
            self._waiting_logged = True
            log.warning("%s is held by %s; waiting up to %.0fs in case that run is gone",
                        self.storage.url, current.describe(now), deadline - now)
        return False

    def _content(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": self._started,
                           "heartbeat": self.clock(), "timeout": self.timeout_s}).encode()

    # ------------------------------------------------------------------ holding

    def renew(self) -> bool:
        """Rewrite the heartbeat; False (and :attr:`lost`) if another run took the lease."""
        if self.generation is None or self.lost:
            return not self.lost
        if any(g > self.generation for g in self.generations()):
            self.lost = True
            return False
        self.storage.write(_file(self.generation), [self._content()])
        return True

    def start_heartbeat(self) -> None:
        """Renew every quarter of the timeout on a background thread until :meth:`release`."""
        interval = max(0.25, self.timeout_s / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        log.error("another run took over the lease on %s", self.storage.url)
                        return
                except Exception as exc:  # storage trouble: try again at the next beat
                    log.warning("lease heartbeat failed (%s: %s)", type(exc).__name__, exc)

        self._thread = threading.Thread(target=beat, name="distrib-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file, if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is None or self.lost:
            return
        try:
            if not any(g > self.generation for g in self.generations()):
                self.storage.delete(_file(self.generation))
        except Exception as exc:  # the next run finds it stale or takes it as the same run
            log.warning("could not release the lease on %s: %s", self.storage.url, exc)
        self.generation = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True

