"""Preemption notices: a signal handler that only sets a flag.

SIGTERM is what Kubernetes (and torchrun, forwarding it) sends before killing a pod; SLURM sends
SIGUSR1 ahead of a time limit when asked to (``--signal=USR1@120``). The handler does nothing but
record the request: no I/O, no locks, no collectives. The trainer looks at :attr:`requested` at
step boundaries, agrees on it across ranks, writes an emergency checkpoint and exits with
:data:`distrib.exitcodes.PREEMPTED`.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionHandler:
    """Install with :meth:`install`, remove with :meth:`uninstall` (or use as a context manager).

    Only the main thread can install signal handlers; elsewhere (e.g. a trainer driven from a
    worker thread) :meth:`install` does nothing and :attr:`requested` stays false.
    """

    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS) -> None:
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.requested = False
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # async-signal context: set plain attributes and return, nothing else
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.received_at = time.monotonic()

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# what a launcher or scheduler sends a rank's whole process group, data-loader workers included
_GROUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT")
                       if hasattr(signal, n))


def detach_worker_process() -> None:
    """Call in a data-loader worker (its ``worker_init_fn``): leave the rank's process group.

    torchrun forwards a preemption notice to each rank's whole process group, which includes the
    rank's data-loader workers; torch's worker signal handler makes a worker die on a SIGTERM that
    does not come from its parent, and the rank then fails with "DataLoader worker ... is killed
    by signal: Terminated" before it can act on the notice. In a group of their own, workers get
    only what their rank sends them, and they still end with it (below). A terminal's Ctrl-C
    likewise reaches only the rank.

    A worker started by :func:`worker_context` begins with these signals blocked, so one sent to
    the rank's group before this call is pending rather than fatal: it is discarded here, after
    the worker has left the group, and the signals are unblocked.

    On Linux the worker also dies the moment its rank does (see :func:`_die_with_parent`).
    """
    _die_with_parent()
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group or session leader: nothing to leave
        pass
    # SLURM signals every process of a job step: SIGUSR1 is the rank's business (the default
    # action would kill the worker); SIGINT reaches the rank through the terminal anyway
    for name in ("SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        if hasattr(signal, "sigtimedwait"):
            while signal.sigtimedwait(_GROUP_SIGNALS, 0) is not None:
                pass  # meant for the rank, which got it too
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _GROUP_SIGNALS)


def _die_with_parent(parent: int | None = None) -> None:
    """Linux: have the kernel SIGKILL this process when the thread that started it ends.

    A forked data-loader worker holds copies of its rank's sockets, the process group's gloo
    connections among them. When the rank is SIGKILLed, its peers learn of it only when the last
    copy of those sockets is closed: torch's watchdog ends an orphaned worker only after up to
    5 s (measured: a 2-rank torchrun job restarted 9.0 s after a rank's SIGKILL with two workers
    per rank, 3.8 s with none). A worker started by the rank's main thread (the loader's
    iterator) dies with the rank instead. If its parent ended while this was being set up, the
    worker leaves now.

    ``parent``: the PID of the process that forked this one, as that process knew it before the
    fork (:func:`worker_context` passes the rank's). Without it the parent is read here, which
    cannot tell a parent that has already ended: the worker would then wait forever (torch's
    watchdog, too, takes the PID it finds at start for its rank's).
    """
    if not sys.platform.startswith("linux"):
        return
    if parent is None:
        # the process that started this one: the rank, or its fork server (which ends with it);
        # not multiprocessing.parent_process(), which names the rank even when a fork server
        # forked it
        parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no libc prctl: torch's watchdog remains
        return
    if os.getppid() != parent:
        os._exit(0)  # the parent ended just before the line above


#: how long a forked data-loader worker may take to reach its first Python line before it is
#: taken for deadlocked (see :func:`worker_context`) and started again
WORKER_START_TIMEOUT_S = 5.0
_START_ATTEMPTS = 4


def worker_context() -> multiprocessing.context.BaseContext:
    """The default multiprocessing context, except that a process starts with the preemption
    signals blocked (see :func:`detach_worker_process`, which its ``worker_init_fn`` must call),
    and a forked process that never starts is started again.

    Without the first, a SIGTERM to the rank's process group that lands between a worker's fork
    and its ``worker_init_fn`` kills the worker (validation loaders start new workers at every
    evaluation). The rank blocks the signals only while it starts the process: one that arrives
    meanwhile is delivered to the rank when they are unblocked, not lost.

    The second: on CPython before 3.12, a fork while another thread of the rank is starting or
    ending (a background checkpoint or records writer) can leave the child deadlocked inside
    ``os.fork()`` on the interpreter's thread-list lock (python/cpython#112275): the worker
    never runs and the rank waits for it forever (seen once in CI as a 300 s hang). So with the
    ``fork`` start method each worker reports through a pipe that it reached Python code; one
    that has not after :data:`WORKER_START_TIMEOUT_S` is SIGKILLed and forked again.

    A forked worker is also bound to its rank's life from its first line of Python, with the
    rank's PID as the rank knew it (:func:`_die_with_parent`): one whose rank was SIGKILLed
    before its ``worker_init_fn`` ran would otherwise take init for its rank and never end.
    """
    base = multiprocessing.get_context()
    if not hasattr(signal, "pthread_sigmask"):
        return base
    forking = base.get_start_method() == "fork"

    class Process(base.Process):  # type: ignore[name-defined, misc]
        _started_fds: tuple[int, int] | None = None
        _forked_by = 0  # the rank's PID, taken before the fork

        def start(self) -> None:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
            try:
                if not forking:
                    super().start()
                    return
                for attempt in range(1, _START_ATTEMPTS + 1):
                    if self._start_and_confirm(last=attempt == _START_ATTEMPTS):
                        return
                    log.warning("a data-loader worker did not start within %.0fs (a fork "
                                "deadlock, python/cpython#112275); starting it again",
                                WORKER_START_TIMEOUT_S)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

        def _start_and_confirm(self, last: bool) -> bool:
            read, write = os.pipe()
            self._started_fds, self._forked_by = (read, write), os.getpid()
            call = vars(self).get("_target"), vars(self).get("_args"), vars(self).get("_kwargs")
            try:
                super().start()  # which drops the target and arguments
            finally:
                os.close(write)
            try:
                ready, _, _ = select.select([read], [], [], None if last
                                            else WORKER_START_TIMEOUT_S)
            finally:
                os.close(read)
            if ready:
                return True
            popen: Any = getattr(self, "_popen")  # noqa: B009  (typeshed leaves it untyped)
            popen.kill()  # never reached Python code: nothing of it to clean up
            popen.wait()
            self._popen = None  # multiprocessing allows start() once per object: undo it
            self._target, self._args, self._kwargs = call
            multiprocessing.process._children.discard(self)  # type: ignore[attr-defined]
            return False

        def run(self) -> None:
            if self._started_fds is not None:  # the child: tell the rank it is alive
                _die_with_parent(self._forked_by)  # from its first line, not its init_fn's
                read, write = self._started_fds
                os.close(read)
                os.write(write, b"1")
                os.close(write)
            super().run()

    context: Any = copy.copy(base)  # the default kind (fork, spawn ...), with this Process
    context.Process = Process
    return context  # type: ignore[no-any-return]


class Preempted(Exception):
    """Raised on every rank after the emergency checkpoint of a preemption is committed."""

    def __init__(self, step: int, signal_name: str | None) -> None:
        super().__init__(f"preempted ({signal_name or 'signal on another rank'}); emergency "
                         f"checkpoint at step {step} committed")
        self.step = step


def _env_seconds(name: str) -> float | None:
    import os

    raw = os.environ.get(name)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def torchrun_env_problem() -> str | None:
    """A warning if torchrun restarts workers while sharing its rendezvous store with them.

    The shared store keeps the previous round's keys and restart counts are per node, so a
    restarted worker can read a dead peer's address and fail to connect, again and again
    (pytorch/pytorch#135712). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment
    gives every round a fresh store; ``python -m distrib.launch`` sets it.
    """
    import os

    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared and restarts.isdigit() and int(restarts) > 0:
        return ("torchrun shares its rendezvous store with the workers, so restarted workers may "
                "fail to reconnect (pytorch/pytorch#135712): set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, or launch with "
                "python -m distrib.launch, which does")
    return None


def shutdown_budget_problems(save_seconds: float | None) -> list[str]:
    """Check the order emergency save < torchrun's shutdown timeout < the pod's grace period.

    torchrun forwards SIGTERM and SIGKILLs its workers ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
    seconds (default 30) later; Kubernetes SIGKILLs the pod ``terminationGracePeriodSeconds``
    after SIGTERM (the manifests pass it as ``DISTRIB_GRACE_PERIOD_SECONDS``). Returns one
    sentence per violated inequality (empty when fine or unknown).
    """
    import os

    problems = []
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    shutdown = _env_seconds("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or (30.0 if under_torchrun else None)
    grace = _env_seconds("DISTRIB_GRACE_PERIOD_SECONDS")
    if shutdown is not None and grace is not None and shutdown >= grace:
        problems.append(f"torchrun's shutdown timeout ({shutdown:.0f}s, "
                        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT) is not below the pod's grace period "
                        f"({grace:.0f}s): the pod may be killed before torchrun's workers finish")
    if save_seconds is not None and shutdown is not None and save_seconds * 1.5 >= shutdown:
        problems.append(f"an emergency checkpoint takes about {save_seconds:.1f}s, too close to "
                        f"torchrun's shutdown timeout ({shutdown:.0f}s): raise "
                        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT (and the grace period above it)")
    return problems
