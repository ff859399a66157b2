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
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)


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
    """A cross-rank OR of a few flags that never blocks the step it is called in.

    Each :meth:`exchange` starts a non-blocking all-reduce of this step's flags and returns the
    result of the *previous* call's reduction, which has long finished by then. Every rank calls
    it at every step boundary, so every rank sees the same agreed flags at the same step, one step
    after they were raised. Collective.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending: tuple[Any, torch.Tensor] | None = None

    def exchange(self, flags: Sequence[bool]) -> list[bool]:
        """Start agreeing on ``flags``; return the flags agreed at the previous call."""
        agreed = self.drain()
        if active():
            t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_comm_device())
            self._pending = (tdist.all_reduce(t, op=tdist.ReduceOp.SUM, async_op=True), t)
        else:
            self._pending = (None, torch.tensor([1.0 if f else 0.0 for f in flags]))
        return agreed

    def drain(self) -> list[bool]:
        """Wait for the reduction in flight and return its result (all False if none)."""
        if self._pending is None:
            return [False] * self.size
        work, t = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        return [v > 0 for v in t.tolist()]
