"""Streams: training and validating on a ``torch.utils.data.IterableDataset``.

Map-style datasets are not handled here: the trainer reads them through a
:class:`~distrib.training.sampler.ResumableSampler`, exactly as before streams existed.

**Sharding.** Every data-loader worker of every rank is one *reader*: with ``W = max(1,
num_workers)`` workers per rank and ``k = world_size x W`` readers, reader ``j = rank x W +
worker`` keeps the items at positions ``j, j + k, j + 2k ...`` of the dataset's stream and skips the
others (:class:`StreamShard`). Any iterable dataset works, also one written without distrib in
mind; the price is that every reader iterates the whole stream, so items should be cheap to
produce (yield a path or a key and decode it in ``collate_fn``, which runs only for the reader's
own items). Before each training epoch the dataset's ``set_epoch(epoch)`` is called if it has one.

**Position.** A reader's position is ``seen``: how many items of the epoch's stream it has read,
its own and the skipped ones alike; every reader reads the same stream, so a position means the
same in every reader.

**Resume.** Training streams are read through torchdata's ``StatefulDataLoader``, which hands
each batch over together with the state of the worker that produced it, so the loader's
``state_dict()`` after a batch is exactly the state after the batches the trainer consumed (per
worker, plus which worker is next). A reader's state is ``{"seen": n, "dataset": s}``, with ``s``
the dataset's own ``state_dict()`` when the dataset is ``Stateful`` (``state_dict`` and
``load_state_dict``, as torchdata defines it) and None otherwise. On resume a ``Stateful``
dataset gets ``load_state_dict(s)`` and continues from there (exact); any other dataset is
iterated from the start of the epoch and the first ``n`` items are read and dropped (exact when
the stream is deterministic). Each rank's state goes into its per-rank checkpoint state.

**End of epoch.** Ranks' streams may end at different batches (a reader's last batch may be
short, workers end at different times). Before each optimizer step every rank fetches all
``--grad-accum-steps`` micro-batches of it, then one small all-reduce says whether every rank
has all of them; if any rank has not, the epoch ends on every rank and the partial group is
dropped, so DDP's gradient all-reduce is never entered by only some ranks.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distrib.checkpoint.format import InvalidCheckpoint
from distrib.checkpoint.statecheck import check_like, check_number
from distrib.config import Config, ConfigError
from distrib.runtime import dist

if TYPE_CHECKING:
    from distrib.tasks import Task

log = logging.getLogger(__name__)


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is read as a stream (an ``IterableDataset``)."""
    return isinstance(dataset, IterableDataset)


def is_stateful(obj: Any) -> bool:
    """torchdata's ``Stateful`` protocol: ``state_dict()`` and ``load_state_dict(state)``."""
    return callable(getattr(obj, "state_dict", None)) and \
        callable(getattr(obj, "load_state_dict", None))


def stream_length(dataset: Any) -> int | None:
    """The number of items a stream yields per epoch, if it defines ``__len__``."""
    try:
        return len(dataset)
    except (TypeError, NotImplementedError):
        return None


def stream_steps(length: int, *, world: int, workers: int, batch_size: int, accum: int) -> int:
    """Optimizer steps in an epoch of a ``length``-item stream: each reader's items make
    ``ceil(items / batch_size)`` batches, and the epoch lasts as many full groups of ``accum``
    batches as the rank with the fewest batches has."""
    per_worker, readers = max(1, workers), world * max(1, workers)
    fewest = min(sum(math.ceil(len(range(r * per_worker + w, length, readers)) / batch_size)
                     for w in range(per_worker)) for r in range(world))
    return fewest // accum


def check_data(config: Config, task: "Task") -> None:
    """ConfigError (before any process group exists) when a stream cannot train with these
    options: torchdata is missing, or an option needs the length of an epoch and the stream has
    no ``__len__``."""
    if not is_stream(task.train_dataset):
        return
    try:
        import torchdata.stateful_dataloader  # noqa: F401
    except ImportError:
        raise ConfigError("--task: the train dataset is an IterableDataset, which needs torchdata "
                          "(pip install 'torchdata>=0.11')") from None
    known, steps = stream_length(task.train_dataset) is not None, bool(config.train.max_steps)
    why = "the train dataset is a stream without __len__, so an epoch's length is unknown"
    scheduler = config.sched.scheduler  # ignored when the task brings its own
    if task.scheduler_factory is not None:
        if not known and not steps:
            raise ConfigError(f"--max-steps: {why}; add --max-steps N (the task's "
                              "scheduler_factory needs the run's total steps)")
    elif scheduler == "step" and not known:
        raise ConfigError(f"--scheduler step: {why} and --step-size counts epochs; use "
                          "--scheduler cosine or warmup-cosine with --max-steps N, or give the "
                          "dataset a __len__")
    elif scheduler in ("cosine", "warmup-cosine") and not known and not steps:
        raise ConfigError(f"--scheduler {scheduler}: {why}; add --max-steps N (the schedule "
                          "spans the run's total optimizer steps)")


def stateful_loader(*args: Any, **kwargs: Any) -> DataLoader[Any]:
    """A torchdata ``StatefulDataLoader`` (the arguments of ``DataLoader``) that snapshots its
    workers' states with every batch, so its ``state_dict()`` fits any step boundary."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():  # torch 2.13 deprecates a call torchdata 0.11 makes
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        loader: DataLoader[Any] = StatefulDataLoader(*args, snapshot_every_n_steps=1, **kwargs)
    return loader


# ==================================================================== the reader


class StreamShard(IterableDataset[Any]):
    """One reader's part of ``dataset``: every ``k``-th item (see the module docstring).

    Built in the rank's process; each data-loader worker iterates its own copy and learns its
    worker index from ``get_worker_info()``. Always ``Stateful`` (``{"seen", "dataset"}``), so that
    torchdata keeps a state per worker whatever the dataset is. :attr:`start` (a reader state,
    or None) is where the next ``iter()`` begins; ``load_state_dict`` sets it.
    """

    def __init__(self, dataset: IterableDataset[Any], rank: int, world: int) -> None:
        self.dataset = dataset
        self.rank, self.world = rank, world
        self.stateful = is_stateful(dataset)
        self.seen = 0
        self.start: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers, me = self.world * workers, self.rank * workers + worker
        start, self.start = self.start, None
        self.seen = int(start["seen"]) if start is not None else 0
        skip = 0
        if start is not None and self.stateful:
            self.dataset.load_state_dict(start["dataset"])  # type: ignore[attr-defined]
        elif start is not None:
            skip = self.seen  # no state of its own: read the consumed items again, drop them
        return self._items(iter(self.dataset), readers, me, skip)

    def _items(self, items: Iterator[Any], readers: int, me: int, skip: int) -> Iterator[Any]:
        for _ in itertools.islice(items, skip):
            pass
        for item in items:
            position = self.seen
            self.seen += 1
            if position % readers == me:
                yield item

    def state_dict(self) -> dict[str, Any]:
        if self.start is not None:  # loaded, not iterated yet
            return dict(self.start)
        return {"seen": self.seen,
                "dataset": self.dataset.state_dict() if self.stateful else None}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = dict(state)


# ==================================================================== training


@dataclass
class Group:
    """The micro-batches of one optimizer step, and the samples in it over all ranks."""

    batches: list[Any]
    samples: int


LoaderFactory = Callable[[StreamShard], DataLoader[Any]]


class TrainStream:
    """One rank's training stream: the epoch's loader, the agreement on the end of an epoch,
    and the per-rank data state for checkpoints (see the module docstring).

    Args:
        dataset: the task's train dataset (an ``IterableDataset``).
        rank, world: this rank and the world size.
        workers: ``--num-workers``.
        batch_size, accum: ``--batch-size`` and ``--grad-accum-steps``.
    """

    def __init__(self, dataset: IterableDataset[Any], *, rank: int, world: int, workers: int,
                 batch_size: int, accum: int) -> None:
        self.dataset = dataset
        self.rank, self.world, self.workers, self.accum = rank, world, workers, accum
        length = stream_length(dataset)
        #: optimizer steps per epoch; 0 when the stream has no ``__len__``
        self.steps_per_epoch = 0 if length is None else stream_steps(
            length, world=world, workers=workers, batch_size=batch_size, accum=accum)
        self._loader: DataLoader[Any] | None = None  # the running epoch's
        self._batches: Iterator[Any] | None = None
        self._epoch = 0
        self._ahead: list[Group | None] = []  # a group fetched ahead by :meth:`is_last`
        self._state: dict[str, Any] | None = None  # the position when no loader can tell it
        self._pending: dict[str, Any] | None = None  # a loader state to resume from
        self._start: dict[str, Any] | None = None  # a reader state every reader starts from

    def start_epoch(self, epoch: int, make_loader: LoaderFactory) -> None:
        """Open the epoch's loader (where a resumed checkpoint left it). Local."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        reader = StreamShard(self.dataset, self.rank, self.world)
        reader.start, self._start = self._start, None
        loader = make_loader(reader)
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == epoch:
            loader.load_state_dict(pending["loader"])  # type: ignore[attr-defined]
        self._batches = iter(loader)
        reader.start = None  # the workers have their copies; a later epoch starts afresh
        self._loader, self._epoch = loader, epoch

    def next_group(self) -> Group | None:
        """The micro-batches of the next optimizer step, or None on every rank when some rank
        has no full group: the epoch is over (the loader is closed). Collective."""
        group = self._ahead.pop() if self._ahead else self._fetch()
        if group is None:
            self.stop(ended=True)
        return group

    def is_last(self) -> bool:
        """Whether the group handed out last is the epoch's last. Fetches the next group ahead
        (a collective) and keeps the position before it for a save at this step boundary."""
        if not self._ahead:
            self._state = self._position()
            self._ahead.append(self._fetch())
        return self._ahead[0] is None

    def stop(self, ended: bool = False) -> None:
        """The epoch ended, or is left early (keeping the position for a later save); shut the
        loader's workers down. Local; does nothing when no epoch is open."""
        if self._loader is not None and not self._ahead:
            self._state = None if ended else self._position()
        self._loader = self._batches = None
        self._ahead.clear()

    def _fetch(self) -> Group | None:
        """The next group if every rank has a full one, else None on every rank. Collective."""
        assert self._batches is not None, "start_epoch() first"
        got = list(itertools.islice(self._batches, self.accum))
        full, samples = dist.all_reduce_sum([float(len(got) == self.accum),
                                             float(sum(_batch_len(b[1]) for b in got))])
        return Group(got, int(samples)) if full == self.world else None

    def _position(self) -> dict[str, Any]:
        assert self._loader is not None
        loader = self._loader.state_dict()  # type: ignore[attr-defined]
        return {"epoch": self._epoch, "workers": self.workers,
                "loader": checkpointable(loader, "the train loader's state")}

    def state(self) -> dict[str, Any] | None:
        """This rank's data state at this step boundary: the position after the batches handed
        out (None between epochs: the next one starts at its beginning)."""
        if self._loader is not None and not self._ahead:
            return self._position()
        return self._state

    # ---------------------------------------------------------------- resume

    def check(self, saved: Sequence[Any], epoch: int) -> None:
        """Rank 0, before anything changes: InvalidCheckpoint unless ``saved`` (every rank's data
        state, in rank order) is what :meth:`load` can resume from in epoch ``epoch``."""
        if all(s is None for s in saved):
            return
        live: Any = None
        if is_stateful(self.dataset):
            try:  # the keys to expect; a dataset may not tell before it is iterated
                live = self.dataset.state_dict()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 (the user's code: check what can be checked)
                live = {}
        for r, data in enumerate(saved):
            where = f"per-rank state of rank {r}: data"
            if not isinstance(data, dict) or set(data) != {"epoch", "workers", "loader"}:
                raise InvalidCheckpoint(f"{where}: expected epoch, workers and loader")
            check_number(data["epoch"], f"{where}.epoch", integer=True)
            check_number(data["workers"], f"{where}.workers", integer=True)
            if data["epoch"] != epoch:
                raise InvalidCheckpoint(f"{where}: for epoch {data['epoch'] + 1}, the checkpoint "
                                        f"is in epoch {epoch + 1}")
            for i, reader in enumerate(reader_states(data["loader"], data["workers"], where)):
                _check_reader(reader, live, f"{where} reader {i}")

    def load(self, saved: Sequence[Any], saved_world: int, epoch: int) -> None:
        """Resume from every rank's data state (checked by :meth:`check`): exactly when the
        world size and worker count are the saved ones; otherwise every reader starts at the
        least advanced saved reader's position (nothing is skipped; what the others had read
        beyond it is read again). Local."""
        if all(s is None for s in saved) or saved[0]["epoch"] != epoch:
            return  # saved between epochs: the next one starts at its beginning
        readers = [r for data in saved for r in reader_states(data["loader"], data["workers"])]
        seen = [int(r["seen"]) for r in readers]
        if saved_world == self.world and all(d["workers"] == self.workers for d in saved):
            self._pending = self._state = saved[self.rank]
        else:
            self._start = readers[seen.index(min(seen))]
            if self.rank == 0:
                log.warning("resuming a stream saved by %d rank(s) x %d reader(s) with %d x %d: "
                            "every reader restarts at item %d of the epoch's stream (the least "
                            "advanced reader's position), so nothing is skipped but up to %d "
                            "items are trained on again; the run is no longer bit-identical to "
                            "an uninterrupted one", saved_world, max(1, saved[0]["workers"]),
                            self.world, max(1, self.workers), min(seen), max(seen) - min(seen))
        if self.rank == 0 and not is_stateful(self.dataset):
            log.warning("the train dataset (%s) has no state_dict()/load_state_dict(): resuming "
                        "by reading its stream again and dropping the first %d items (exact only "
                        "if the stream is deterministic)", type(self.dataset).__name__,
                        min(seen) if self._start is not None else max(seen))


def _batch_len(target: Any) -> int:
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.dim() else 1
    return len(target)


# ==================================================================== the saved state

# The layout of torchdata's StatefulDataLoader state for an IterableDataset (torchdata 0.11);
# None where anything is accepted. A reader's state sits at each "dataset_state".
_FETCHER = {"dataset_iter_state": None, "fetcher_ended": False}
_SINGLE_PROCESS = {"_index_sampler_state": None, "_sampler_iter_state": None,
                   "_sampler_iter_yielded": 0, "_num_yielded": 0,
                   "_IterableDataset_len_called": None, "_shared_seed": None,
                   "fetcher_state": _FETCHER, "dataset_state": None, "_iterator_finished": False}
_MAIN = {"_num_workers": 0, "_sampler_iter_state": None, "_index_sampler_state": None,
         "_sampler_iter_yielded": 0, "_IterableDataset_len_called": None, "_shared_seed": None,
         "_base_seed": 0}


def _multi_process(workers: int) -> dict[str, Any]:
    return {"_snapshot": {"_snapshot_step": 0, "_last_yielded_worker_id": 0, "_main_snapshot": _MAIN,
                          "_worker_snapshots": {f"worker_{i}": {"worker_id": 0,
                                                                "fetcher_state": _FETCHER,
                                                                "dataset_state": None}
                                                for i in range(workers)}},
            "_steps_since_snapshot": 0, "_iterator_finished": False}


def reader_states(loader: Any, workers: int, where: str = "data") -> list[Any]:
    """The reader states inside a loader state of ``workers`` workers; InvalidCheckpoint when
    it does not have torchdata's layout (so a malformed one is never handed to torchdata)."""
    if workers == 0:
        check_like(loader, _SINGLE_PROCESS, f"{where}.loader")
        for key in ("_num_yielded", "_sampler_iter_yielded"):
            check_number(loader[key], f"{where}.loader.{key}", integer=True)
        return [loader["dataset_state"]]
    if not 0 < workers <= 256:
        raise InvalidCheckpoint(f"{where}.workers: {workers} is out of range")
    check_like(loader, _multi_process(workers), f"{where}.loader")
    snap = loader["_snapshot"]
    check_number(snap["_snapshot_step"], f"{where}.loader step", integer=True)
    check_number(snap["_main_snapshot"]["_sampler_iter_yielded"], f"{where}.loader yielded",
                 integer=True)
    if loader["_steps_since_snapshot"] != 0:  # snapshots are taken at every batch
        raise InvalidCheckpoint(f"{where}.loader: batches since the last snapshot")
    if snap["_main_snapshot"]["_num_workers"] != workers or \
            snap["_last_yielded_worker_id"] not in range(workers) or \
            type(snap["_main_snapshot"]["_base_seed"]) is not int:
        raise InvalidCheckpoint(f"{where}.loader: inconsistent worker count, worker or seed")
    states = []
    for i in range(workers):
        worker = snap["_worker_snapshots"][f"worker_{i}"]
        if worker["worker_id"] != i:
            raise InvalidCheckpoint(f"{where}.loader: worker {i} is labelled {worker['worker_id']}")
        states.append(worker["dataset_state"])
    return states


def _check_reader(reader: Any, live: Any, where: str) -> None:
    """A :class:`StreamShard` state: a position, and the dataset's own state shaped like the
    live dataset's (a mapping with the same keys) when it is ``Stateful``, else None."""
    if not isinstance(reader, dict) or set(reader) != {"seen", "dataset"}:
        raise InvalidCheckpoint(f"{where}: expected seen and dataset")
    check_number(reader["seen"], f"{where}.seen", integer=True)
    state = reader["dataset"]
    if (state is None) != (live is None):
        raise InvalidCheckpoint(f"{where}: the dataset {'is' if live is not None else 'is not'} "
                                "Stateful, the saved state says otherwise")
    if isinstance(live, dict) and live and (not isinstance(state, dict) or set(state) != set(live)):
        raise InvalidCheckpoint(f"{where}.dataset: keys do not fit the dataset's state_dict()")


def checkpointable(obj: Any, where: str) -> Any:
    """A copy of ``obj`` made of what a checkpoint holds (dicts, lists, tuples, numbers,
    strings, None, tensors, numpy arrays); numpy scalars become numbers, tensors are detached
    CPU copies. TypeError, naming where, for anything else (distrib never pickles)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (list, tuple)):
        items = [checkpointable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int, float, bool, tuple)) else _bad(k, where):
                checkpointable(v, f"{where}.{k}") for k, v in obj.items()}
    return _bad(obj, where)


def _bad(obj: Any, where: str) -> Any:
    raise TypeError(f"cannot checkpoint the {type(obj).__name__} at {where}: a stream's "
                    "state_dict() may hold only tensors, numpy arrays, numbers, strings, None, "
                    "lists, tuples and dicts")

