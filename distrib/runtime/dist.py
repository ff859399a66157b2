"""The process group and every collective distrib uses, in one place.

The group is configured from the variables torchrun (or Kubernetes / SLURM wrappers) set:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. gloo is used on CPU,
nccl with one GPU per local rank on CUDA. With a world size of 1 no group is created and every
collective below is a cheap local no-op, so the same code runs under plain ``python``.

Contract for every collective here: **all ranks call it, in the same order, or none does.** Never
call one under ``if rank == 0``, in a signal handler or in an ``except`` block; decide locally,
reduce, then act together.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


def _import_functional_before_group() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists, if it is not
    imported yet.

    That module puts ``group.WORLD`` into its functions' default arguments when it is first
    imported. DDP imports it lazily (through torch._dynamo); imported after the group exists, it
    keeps the group alive after ``destroy_process_group()``: its gloo threads then meet
    interpreter finalization, and one that drops the last reference to a finished Work while the
    main thread finalizes aborts the process ("terminate called without an active exception",
    exit -6, seen in about 1 of 6 plain DDP scripts on CPU). Imported before the group exists,
    the defaults hold None. Called when distrib is imported (so an own loop that imports distrib
    before ``init_process_group`` is covered) and again before distrib creates a group.
    """
    if tdist.is_available() and not tdist.is_initialized():
        importlib.import_module("torch.distributed.nn.functional")  # not `import torch.…`:
        # that would make `torch` a local name of the calling function


_import_functional_before_group()


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, got {raw!r}") from None


def info_from_env() -> DistInfo:
    """Read rank and world size from the environment (rank 0 of 1 when not launched by torchrun)."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is not within WORLD_SIZE={world}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def setup(timeout_s: float) -> tuple[DistInfo, bool]:
    """Create the process group if the job has more than one rank and none exists yet.

    Returns the job's :class:`DistInfo` and whether this call created the group (the creator is
    the one that must call :func:`teardown`). Every rank must call it.
    """
    info = info_from_env()
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if info.world_size == 1 or tdist.is_initialized():
        return info, False
    _import_functional_before_group()
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    tdist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                             timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("process group ready: backend=%s rank=%d world=%d", backend, info.rank,
              info.world_size)
    return info, True


def teardown(graceful: bool = False) -> None:
    """Leave the process group, if there is one. Safe to call on error paths.

    ``graceful`` (every rank, after its last collective): rank 0 leaves last. Rank 0 usually hosts
    the TCPStore (always outside torchrun, and under torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``); a peer whose store client is still alive when the
    server goes away can abort with "terminate called without an active exception". So peers
    report through the store that they have left, and rank 0 waits for them (bounded).

    The group's threads and store really go away only when nothing references the group any
    more: callers drop what holds it (a DDP module, a pending Work) first.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    store, rank, world = None, tdist.get_rank(), tdist.get_world_size()
    if graceful and world > 1:
        try:
            store = tdist.distributed_c10d._get_default_store()
        except Exception:  # a private helper: fall back to a plain teardown
            store = None
    tdist.destroy_process_group()
    if store is None:
        return
    try:
        if rank != 0:
            store.add("distrib/left", 1)
            return
        deadline = time.monotonic() + 10.0
        while store.add("distrib/left", 0) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # let the peers' clients close their connections
    except Exception as exc:  # a peer or the store went away first: nothing left to protect
        log.debug("graceful teardown: %s", exc)


def active() -> bool:
    """Whether collectives do anything (a group with more than one rank exists)."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def _comm_device() -> torch.device:
    if active() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives. Collective."""
    if active():
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank returns rank ``src``'s ``obj`` (pickled; for small objects). Collective."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Rank ``dst`` returns every rank's ``obj`` in rank order; other ranks return None. Collective."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    tdist.gather_object(obj, out, dst=dst)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank returns every rank's ``obj`` in rank order (pickled; small objects). Collective."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_bytes(data: torch.Tensor | None, nbytes: int, src: int) -> torch.Tensor:
    """Every rank returns rank ``src``'s flat uint8 CPU tensor of ``nbytes`` bytes (``data`` on
    ``src``; ignored elsewhere). ``nbytes`` must be the same on every rank (broadcast it first).
    Collective."""
    if not active():
        assert data is not None
        return data
    buf = data if rank() == src and data is not None else torch.empty(nbytes, dtype=torch.uint8)
    device = _comm_device()
    moved = buf.to(device) if device.type != "cpu" else buf
    tdist.broadcast(moved, src=src)
    return moved.cpu() if device.type != "cpu" else moved


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks, in float64. Collective.

    Used for exact means: reduce (sum, count) pairs, then divide once.
    """
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one. Collective."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


class LaggedAgreement:
    """A cross-rank OR of a few flags that never blocks the step it is called in, and costs one
    small non-blocking all-reduce every :attr:`interval` calls.

    Every rank calls :meth:`exchange` at every step boundary. A call that is *due* starts a
    non-blocking all-reduce of the flags raised since the previous due call, together with this
    rank's mean time per call, and returns the flags agreed at the previous due call (whose
    reduction has long finished by then); other calls return all False. At each due call the
    interval is recomputed from the *agreed* mean time per call, so that due calls are about
    ``target_seconds`` apart (between 1 and ``max_interval`` calls). Every rank derives it from
    the same reduced integers, so every rank is due at the same calls and sees the same agreed
    flags at the same step. A flag is acted on at most two intervals after it was raised (about
    2 x ``target_seconds``; one call when steps are slower than ``target_seconds``).

    Why not every call: launching even a tiny all-reduce costs ~0.3 ms of the training thread on
    gloo, 1% of a 30 ms step. Collective.
    """

    def __init__(self, size: int, target_seconds: float = 0.25, max_interval: int = 64) -> None:
        self.size = size
        self.target_us = max(1, int(target_seconds * 1e6))
        self.max_interval = max_interval
        self.interval = 1  # until the first agreed timing arrives
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._raised = [False] * size
        self._countdown = 1
        self._calls = 0
        self._since = time.perf_counter()

    def exchange(self, flags: Sequence[bool], due: bool = False) -> list[bool]:
        """Note ``flags``; on a due call start agreeing on them and return the flags agreed at
        the previous due call. All False on the other calls. ``due=True`` makes this call due
        (at points every rank passes with the same value, such as an epoch end)."""
        self._raised = [a or bool(b) for a, b in zip(self._raised, flags)]
        self._calls += 1
        self._countdown -= 1
        if self._countdown > 0 and not due:
            return [False] * self.size
        now = time.perf_counter()
        per_call_us = int((now - self._since) / self._calls * 1e6)
        self._since, self._calls = now, 0
        agreed, mean_us = self._finish()
        if mean_us is not None and active():  # alone, agreeing costs nothing: every call
            self.interval = max(1, min(self.max_interval, self.target_us // max(1, mean_us)))
        self._countdown = self.interval
        # float64 holds these integers exactly, so the sum is the same on every rank
        t = torch.tensor([1.0 if f else 0.0 for f in self._raised] + [float(per_call_us)],
                         dtype=torch.float64, device=_comm_device() if active() else None)
        self._raised = [False] * self.size
        work = tdist.all_reduce(t, op=tdist.ReduceOp.SUM, async_op=True) if active() else None
        self._pending = (work, t)
        return agreed

    def drain(self) -> list[bool]:
        """Wait for the reduction in flight and return its result (all False if none)."""
        return self._finish()[0]

    def _finish(self) -> tuple[list[bool], int | None]:
        """(agreed flags, agreed mean microseconds per call) of the reduction in flight."""
        if self._pending is None:
            return [False] * self.size, None
        work, t = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        values = t.tolist()
        return [v > 0 for v in values[:-1]], int(values[-1]) // world_size()
