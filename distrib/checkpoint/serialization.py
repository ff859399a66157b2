"""Turn a nested training state into JSON plus one flat byte stream of tensor data, and back.

No pickle is involved in either direction, so loading a checkpoint can never execute code:

* :func:`flatten_state` walks dicts, lists, tuples, numbers, strings, None, tensors and numpy
  arrays. Tensors are replaced by ``{"__tensor__": i}`` and collected in a list; tuples, dicts with
  non-string keys and non-finite floats are tagged so that :func:`unflatten_state` rebuilds them
  exactly (an optimizer's integer state keys stay integers). Any other type is a TypeError that
  names where in the state it was found.
* :func:`plan_layout` places every tensor's bytes in one stream (64-byte aligned). Shard files
  are written from a :class:`ByteSource`, which hands out any byte range of that stream as a list
  of memoryviews: :class:`FlatBuffer` is a reusable CPU buffer (pinned when CUDA is present) that a
  snapshot is copied into (asynchronous saves: training goes on while it is written), and
  :class:`TensorSource` reads straight from the tensors' own memory (synchronous saves: the
  tensors do not change while the write runs, so the snapshot copy is skipped).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from distrib.checkpoint.format import ALIGN, DTYPES, MAX_DEPTH, InvalidCheckpoint, TensorEntry, check_depth

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def flatten_state(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """Split ``obj`` into a JSON-able skeleton and the list of tensors it references."""
    tensors: list[torch.Tensor] = []
    skeleton = _encode(obj, tensors, "state")
    try:  # what a reader would refuse must not be written: the state file wraps it once more
        check_depth(skeleton, "state", MAX_DEPTH - 1)
    except InvalidCheckpoint as exc:
        raise TypeError(f"cannot checkpoint this state: {exc}") from None
    return skeleton, tensors


def _encode(obj: Any, tensors: list[torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str, int)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, np.ndarray):
        tensors.append(torch.from_numpy(np.ascontiguousarray(obj)))
        return {"__ndarray__": len(tensors) - 1}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {where}; use tensors, numbers, "
                    "strings, lists, tuples and dicts")


def unflatten_state(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        (tag, value), = skeleton.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__ndarray__":
            return tensors[value].numpy()
        if tag == "__tuple__":
            return tuple(unflatten_state(v, tensors) for v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__dict__":
            return {_freeze(unflatten_state(k, tensors)): unflatten_state(v, tensors)
                    for k, v in value}
    return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, (list, tuple)) else key


@dataclass(frozen=True)
class Layout:
    """The placement of every tensor in one byte stream of ``total`` bytes."""

    entries: tuple[TensorEntry, ...]
    total: int


def plan_layout(tensors: list[torch.Tensor]) -> Layout:
    """Place ``tensors`` one after another, each at a 64-byte aligned offset."""
    entries, offset = [], 0
    for t in tensors:
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise TypeError(f"cannot checkpoint a tensor of dtype {t.dtype} (allowed: "
                            f"{', '.join(DTYPES)})")
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(offset, nbytes, str(t.dtype).removeprefix("torch."),
                                   tuple(t.shape)))
        offset += -(-nbytes // ALIGN) * ALIGN
    return Layout(tuple(entries), offset)


def _dtype(name: str) -> torch.dtype:
    """The torch dtype of an allow-listed name (:data:`distrib.checkpoint.format.DTYPES`)."""
    dtype = getattr(torch, name, None) if name in DTYPES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor dtype {name!r} is not allowed in a checkpoint")
    return dtype


def _place(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The view of ``buffer`` that holds ``entry``'s tensor."""
    raw = buffer[entry.offset:entry.offset + entry.nbytes]
    dtype = _dtype(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return raw.view(dtype).view(entry.shape)


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors of ``layout`` out of a flat uint8 ``buffer`` holding its stream (copies:
    each tensor gets its own storage, as a checkpoint read gives them; some consumers, such as
    ``torch.set_rng_state``, fail on a view into a larger storage)."""
    return [_place(buffer, e).clone() for e in layout.entries]


class ByteSource(Protocol):
    """The tensor byte stream of one checkpoint, as the writer reads it."""

    def prepare(self) -> None:
        """Make every byte available (finish deferred or device copies). Call once, first."""

    def segments(self, start: int, stop: int) -> list[memoryview]:
        """Memoryviews that, concatenated, are stream bytes ``[start, stop)`` (no copy)."""
        ...


class FlatBuffer:
    """A reusable uint8 CPU buffer that snapshots tensors at their layout offsets.

    The buffer is reallocated only when a layout needs more bytes than it holds, so periodic saves
    of the same state reuse one allocation. On CUDA machines it is pinned so device-to-host copies
    are asynchronous DMA transfers.

    A snapshot may be split in two: :meth:`fill` copies at once every tensor that ``defer`` does
    not claim, and :meth:`copy_deferred` (typically on a background thread) copies the rest. The
    caller must keep the deferred tensors unchanged until :meth:`copy_deferred` returns.
    """

    def __init__(self) -> None:
        self.data = torch.empty(0, dtype=torch.uint8)
        self.pending: torch.cuda.Event | None = None
        self._deferred: list[tuple[torch.Tensor, TensorEntry]] = []

    def fill(self, tensors: list[torch.Tensor], layout: Layout,
             defer: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Copy ``tensors`` into the buffer, except those ``defer`` claims (kept for
        :meth:`copy_deferred`). CUDA copies are enqueued, not awaited: call :meth:`ready`
        (from any thread) before reading the bytes."""
        if self.data.numel() < layout.total:
            pin = torch.cuda.is_available()
            self.data = torch.empty(layout.total, dtype=torch.uint8, pin_memory=pin)
        now = [(t, e) for t, e in zip(tensors, layout.entries) if e.nbytes]
        self._deferred = [(t, e) for t, e in now if defer is not None and defer(t)]
        claimed = {id(t) for t, _ in self._deferred}
        self._copy([(t, e) for t, e in now if id(t) not in claimed])

    def copy_deferred(self) -> None:
        """Copy the tensors :meth:`fill` deferred (call once, from any thread)."""
        pairs, self._deferred = self._deferred, []
        self._copy(pairs)

    def _copy(self, pairs: list[tuple[torch.Tensor, TensorEntry]]) -> None:
        on_cuda = False
        for t, entry in pairs:
            _place(self.data, entry).copy_(t, non_blocking=t.is_cuda)
            on_cuda = on_cuda or t.is_cuda
        if on_cuda:
            self.pending = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.pending.record()

    def ready(self) -> None:
        """Block until every copy enqueued so far has landed."""
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None

    def view(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of the buffer, without a copy."""
        return memoryview(self.data.numpy()).cast("B")[start:stop]  # type: ignore[arg-type]

    def prepare(self) -> None:
        """:class:`ByteSource`: finish the deferred copies and wait for device copies."""
        self.copy_deferred()
        self.ready()

    def segments(self, start: int, stop: int) -> list[memoryview]:
        """:class:`ByteSource`: one contiguous slice of the buffer."""
        return [self.view(start, stop)]


_ZEROS = memoryview(bytes(ALIGN))


class _Spans:
    """The byte spans ``(offset, memory)`` of tensors laid out in one stream, by offset."""

    def __init__(self, spans: list[tuple[int, memoryview]]) -> None:
        self._spans = sorted(spans, key=lambda span: span[0])
        self._starts = [offset for offset, _ in self._spans]

    def _cover(self, start: int, stop: int, filler: memoryview) -> list[memoryview]:
        """Memoryviews that, in order, are stream bytes ``[start, stop)``: slices of the spans,
        and slices of ``filler`` (repeated as needed) for bytes no span holds."""
        spans, out, pos = self._spans, [], start
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while pos < stop:
            if i < len(spans) and spans[i][0] + len(spans[i][1]) <= pos:
                i += 1
                continue
            if i >= len(spans) or spans[i][0] > pos:
                gap_end = stop if i >= len(spans) else min(spans[i][0], stop)
                while pos < gap_end:
                    n = min(len(filler), gap_end - pos)
                    out.append(filler[:n])
                    pos += n
                continue
            offset, view = spans[i]
            hi = min(offset + len(view), stop)
            out.append(view[pos - offset:hi - offset])
            pos = hi
        return out


class _SpanSource(_Spans):
    """A :class:`ByteSource` over spans of memory that already hold the stream's bytes (padding
    reads as zeros)."""

    def __init__(self, spans: list[tuple[int, memoryview]], total: int) -> None:
        super().__init__(spans)
        self.total = total

    def prepare(self) -> None:
        """Nothing to wait for: the bytes are there."""

    def segments(self, start: int, stop: int) -> list[memoryview]:
        """:class:`ByteSource`: slices of the spans, and zeros for padding."""
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"bytes [{start}, {stop}) are outside the stream of {self.total}")
        return self._cover(start, stop, _ZEROS)


class TensorSource(_SpanSource):
    """The stream of ``layout`` read from the tensors themselves: no snapshot copy.

    CPU tensors that are contiguous are used in place; any other tensor (on a device, or
    non-contiguous) is copied to CPU once, here. Alignment padding reads as zeros. The caller must
    keep the tensors unchanged until the write that reads the segments has finished, so this
    suits synchronous saves only.
    """

    def __init__(self, tensors: list[torch.Tensor], layout: Layout) -> None:
        spans: list[tuple[int, memoryview]] = []
        for t, entry in zip(tensors, layout.entries):
            if not entry.nbytes:
                continue
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.detach().to("cpu").contiguous()
            spans.append((entry.offset, _bytes_of(t)))
        super().__init__(spans, layout.total)


class ViewSource(_SpanSource):
    """The stream held by byte buffers laid end to end (a committed checkpoint's shard files,
    mapped into memory): no copy."""

    def __init__(self, views: list[memoryview]) -> None:
        spans, offset = [], 0
        for view in views:
            spans.append((offset, view))
            offset += len(view)
        super().__init__(spans, offset)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


class TensorSink(_Spans):
    """Tensors for ``layout`` (each with its own storage), and the byte segments a range of the
    stream must be read into (see :meth:`segments`).

    With ``wanted``, only those tensor indices get a tensor; the others are None and their bytes
    go to scratch memory (they must still be read to verify a shard's checksum). ``targets``
    (from :func:`live_targets`) are existing tensors that receive their entry's bytes in place;
    every other tensor is freshly allocated.
    """

    SCRATCH = 8 << 20

    def __init__(self, layout: Layout, wanted: set[int] | None = None,
                 targets: dict[int, torch.Tensor] | None = None) -> None:
        self.layout = layout
        targets = targets or {}
        self.tensors: list[torch.Tensor | None] = [
            None if wanted is not None and i not in wanted
            else targets[i] if i in targets else torch.empty(e.shape, dtype=_dtype(e.dtype))
            for i, e in enumerate(layout.entries)]
        super().__init__([(e.offset, _bytes_of(t)) for e, t in zip(layout.entries, self.tensors)
                          if t is not None and e.nbytes])

    def needs(self, start: int, stop: int) -> bool:
        """Whether any wanted tensor has bytes in ``[start, stop)``."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._starts[i] + len(self._spans[i][1]) > start:
            return True
        return i + 1 < len(self._starts) and self._starts[i + 1] < stop

    def segments(self, start: int, stop: int) -> list[memoryview]:
        """Buffers that, filled in order, receive stream bytes ``[start, stop)``: slices of the
        wanted tensors, and scratch memory for everything else. Scratch buffers are reused, so
        consume (checksum) each segment as soon as it is filled."""
        scratch = memoryview(bytearray(min(self.SCRATCH, max(stop - start, 0))))
        return self._cover(start, stop, scratch)


def live_targets(skeleton: Any, layout: Layout, live: Any) -> dict[int, torch.Tensor]:
    """The tensors of ``live`` (a state tree like the saved one, e.g. the live model's and
    optimizer's state dicts) that can receive the bytes of the saved tensor at the same place in
    ``skeleton`` in place: CPU, contiguous, the same dtype and shape. Tensors whose memory
    overlaps another target's (tied weights) are left out, so that no two reads write the same
    memory. Reading into them is what ``dcp.load`` does: no allocation, one copy."""
    found: list[tuple[int, torch.Tensor]] = []

    def fits(t: Any, i: Any) -> bool:
        if not (isinstance(t, torch.Tensor) and isinstance(i, int) and 0 <= i < len(
                layout.entries)):
            return False
        e = layout.entries[i]
        return (t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
                and str(t.dtype).removeprefix("torch.") == e.dtype and tuple(t.shape) == e.shape
                and e.nbytes > 0)

    def walk(saved: Any, obj: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if isinstance(saved, list) and isinstance(obj, list):
            for s, o in zip(saved, obj):
                walk(s, o, depth + 1)
            return
        if not isinstance(saved, dict):
            return
        if len(saved) == 1:
            (tag, value), = saved.items()
            if tag == "__tensor__":
                if fits(obj, value):
                    found.append((value, obj.detach()))
                return
            if tag == "__tuple__" and isinstance(obj, tuple) and isinstance(value, list):
                walk(value, list(obj), depth + 1)
                return
            if tag == "__dict__" and isinstance(obj, dict) and isinstance(value, list):
                for pair in value:
                    key = _plain_key(pair[0] if isinstance(pair, list) and len(pair) == 2
                                     else None)
                    if key is not None and key in obj:
                        walk(pair[1], obj[key], depth + 1)
                return
        if isinstance(obj, dict):
            for key, s in saved.items():
                if key in obj:
                    walk(s, obj[key], depth + 1)

    walk(skeleton, live, 0)
    targets: dict[int, torch.Tensor] = {}
    end = -1
    for i, t in sorted(found, key=lambda pair: pair[1].data_ptr()):
        if t.data_ptr() >= end and i not in targets:
            targets[i] = t
            end = t.data_ptr() + t.numel() * t.element_size()
    return targets


def _plain_key(key: Any) -> Any:
    """A saved dict key that is a plain int or string (an optimizer's state keys), else None."""
    return key if isinstance(key, (int, str)) and not isinstance(key, bool) else None


def tensor_indices(skeleton: Any) -> set[int]:
    """The tensor indices referenced anywhere inside a skeleton (sub)tree."""
    found: set[int] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            if len(node) == 1 and next(iter(node)) in ("__tensor__", "__ndarray__"):
                found.add(int(next(iter(node.values()))))
                return
            for v in node.values():
                walk(v)
    walk(skeleton)
    return found
