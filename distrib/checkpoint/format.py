"""The checkpoint format on storage, parsed from untrusted bytes into typed objects.

Everything a reader takes from storage goes through one parser here: the manifest
(:class:`Manifest`), the state file's tensor index (:class:`StateIndex`), the ``COMPLETE`` marker
and the progress heartbeat (:func:`parse_marker`). Each parse bounds the input's size and nesting
depth, checks every field's type and range, and raises :class:`InvalidCheckpoint` with a one-line
reason on the first violation; nothing is allocated from a value before it is checked against
what was actually read.

A manifest (format version 2) protects itself: the file starts with
``{"manifest_checksum": "<xxh3-128 hex>", `` and the checksum covers every byte after that
prefix, so it is checked before the JSON is parsed at all. Version 1 manifests (no checksum) are
still read.

Layout rules checked before any tensor is allocated (:meth:`StateIndex.parse`): every dtype is
on an allow-list; ``nbytes == numel * itemsize``; every tensor lies inside the byte stream, at a
64-byte aligned offset, and no two overlap; the stream's length equals the sum of the shard sizes
listed in the (already checked) manifest; every tensor index the state skeleton references
exists, and every tag in the skeleton is well formed. Allocation is therefore bounded by the
checkpoint's own size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import xxhash

FORMAT = "distrib-checkpoint"
VERSION = 2
CHECKSUM = "xxh3_128"
ALIGN = 64

MAX_MANIFEST_BYTES = 16 << 20
MAX_STATE_BYTES = 1 << 30
MAX_MARKER_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_DIMS = 32
MAX_FILES = 1 << 20
MAX_SIZE = 1 << 50  # a file or stream size beyond this is a lie (a petabyte)

STATE_RE = re.compile(r"^state-[0-9a-f]{1,64}\.json$")
SHARD_RE = re.compile(r"^shard-(\d{5,9})-[0-9a-f]{1,64}\.bin$")
_HEX128 = re.compile(r"^[0-9a-f]{32}$")
_PREFIX = b'{"manifest_checksum": "'
_SEP = b'", '

#: dtypes a checkpoint may hold: plain numeric and boolean types (no quantized or opaque types)
DTYPES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2,
    "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
#: dtypes numpy can represent (``__ndarray__`` entries)
NUMPY_DTYPES = frozenset(DTYPES) - {"bfloat16", "float8_e4m3fn", "float8_e5m2"}
TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


class InvalidCheckpoint(ValueError):
    """What was read from storage breaks the format; the message is one line."""


def _fail(what: str, why: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(f"{what}: {why}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def load_json(data: bytes, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON of at most ``max_bytes`` bytes and ``max_depth`` levels of nesting."""
    if len(data) > max_bytes:
        raise _fail(what, f"{len(data)} bytes, more than the {max_bytes} allowed")
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise _fail(what, f"nested more than {max_depth} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(what, f"not valid JSON ({_short(exc)})") from None
    check_depth(value, what, max_depth)
    return value


def check_depth(value: Any, what: str, max_depth: int) -> None:
    """Iteratively, so that checking a deep value cannot itself overflow the stack."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            if depth > max_depth:
                raise _fail(what, f"nested more than {max_depth} levels deep")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- field checks


def _int(obj: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = MAX_SIZE,
         default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(what, f"{key!r} must be an integer in [{lo}, {hi}] (got {_show(value)})")
    return value


def _number(value: Any, what: str, key: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _fail(what, f"{key!r} must be a finite number (got {_show(value)})")
    return float(value)


def _str(obj: Mapping[str, Any], key: str, what: str, optional: bool = False,
         limit: int = 4096) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(what, f"{key!r} must be a string (got {_show(value)})")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value)[:40] if _jsonable(value) else type(value).__name__
    return text


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def safe_name(name: Any, what: str) -> str:
    """``name`` if it is a plain file name (no separator, not ``.``/``..``, printable ASCII)."""
    if (not isinstance(name, str) or not 0 < len(name) <= 255 or name in (".", "..")
            or not re.fullmatch(r"[A-Za-z0-9._-]+", name)):
        raise _fail(what, f"file name {_show(name)} is not a plain name inside the checkpoint")
    return name


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    """One data file of a checkpoint: a plain name inside its step directory."""

    name: str
    size: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "checksum": self.checksum}


@dataclass(frozen=True)
class Metric:
    """The monitored metric at the save (``value`` None when it was NaN or infinite)."""

    name: str
    value: float | None
    mode: Literal["min", "max"]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "mode": self.mode}

    @staticmethod
    def parse(raw: Any, what: str) -> "Metric | None":
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise _fail(what, f"'metric' must be an object or null (got {_show(raw)})")
        mode = raw.get("mode", "min")
        if mode not in ("min", "max"):
            raise _fail(what, f"metric 'mode' must be min or max (got {_show(mode)})")
        return Metric(_str(raw, "name", what) or "", _number(raw.get("value"), what, "value",
                                                             optional=True), mode)


@dataclass(frozen=True)
class Meta:
    """What the writer says about a checkpoint besides its files (all optional for the store)."""

    epoch: int = 0
    world_size: int | None = None
    final: bool = False
    metric: Metric | None = None
    config: dict[str, Any] | None = None
    config_fingerprint: str | None = None
    torch: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "final": self.final,
                               "metric": None if self.metric is None else self.metric.to_json()}
        for key in ("world_size", "config", "config_fingerprint", "torch"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @staticmethod
    def parse(raw: Mapping[str, Any], what: str) -> "Meta":
        final = raw.get("final", False)
        if not isinstance(final, bool):
            raise _fail(what, f"'final' must be true or false (got {_show(final)})")
        config = raw.get("config")
        if config is not None and not isinstance(config, dict):
            raise _fail(what, f"'config' must be an object (got {_show(config)})")
        world = raw.get("world_size")
        return Meta(epoch=_int(raw, "epoch", what, default=0), final=final,
                    world_size=None if world is None else _int(raw, "world_size", what, lo=1,
                                                               hi=1 << 24),
                    metric=Metric.parse(raw.get("metric"), what), config=config,
                    config_fingerprint=_str(raw, "config_fingerprint", what, optional=True),
                    torch=_str(raw, "torch", what, optional=True))


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's manifest: the commit marker, listing every data file."""

    step: int
    created: float
    state_file: str
    shard_bytes: int
    files: tuple[FileEntry, ...]
    meta: Meta = field(default_factory=Meta)
    version: int = VERSION

    @property
    def shards(self) -> tuple[FileEntry, ...]:
        """The shard files in stream order (the parser checked their names and sizes)."""
        return tuple(f for f in self.files if f.name != self.state_file)

    @property
    def state(self) -> FileEntry:
        return next(f for f in self.files if f.name == self.state_file)

    @property
    def total(self) -> int:
        """The length of the tensor byte stream."""
        return sum(f.size for f in self.shards)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """The manifest file: version 2, its checksum in front of the rest."""
        body = {"format": FORMAT, "version": VERSION, "step": self.step, "checksum": CHECKSUM,
                "created": self.created, "state_file": self.state_file,
                "shard_bytes": self.shard_bytes, "files": [f.to_json() for f in self.files],
                **self.meta.to_json()}
        rest = json.dumps(body, indent=1, allow_nan=False).encode()[1:]  # without the "{"
        digest = xxhash.xxh3_128(rest).hexdigest().encode()
        return _PREFIX + digest + _SEP + rest

    @staticmethod
    def parse(data: bytes, step: int | None = None) -> "Manifest":
        """The manifest in ``data`` (of step directory ``step``, if given); InvalidCheckpoint
        on any violation, the manifest's own checksum checked first."""
        what = "manifest"
        checked = False
        if data.startswith(_PREFIX):
            digest = data[len(_PREFIX):len(_PREFIX) + 32]
            rest = data[len(_PREFIX) + 32 + len(_SEP):]
            if data[len(_PREFIX) + 32:len(_PREFIX) + 32 + len(_SEP)] != _SEP \
                    or xxhash.xxh3_128(rest).hexdigest().encode() != digest:
                raise _fail(what, "its own checksum does not match (the manifest is damaged)")
            checked = True
        raw = load_json(data, what, MAX_MANIFEST_BYTES)
        if not isinstance(raw, dict):
            raise _fail(what, f"must be a JSON object (got {type(raw).__name__})")
        if raw.get("format") != FORMAT:
            raise _fail(what, f"not a {FORMAT} manifest (format {_show(raw.get('format'))})")
        version = raw.get("version")
        if type(version) is not int or version < 1:
            raise _fail(what, f"'version' must be a positive integer (got {_show(version)})")
        if version > VERSION:
            raise _fail(what, f"format version {version} is newer than this distrib's ({VERSION})")
        if version >= 2 and not checked:
            raise _fail(what, "its own checksum is missing (the manifest is damaged)")
        got_step = _int(raw, "step", what)
        if step is not None and got_step != step:
            raise _fail(what, f"it says step {got_step}, but lies in the directory of step {step}")
        if raw.get("checksum") != CHECKSUM:
            raise _fail(what, f"unknown checksum algorithm {_show(raw.get('checksum'))}")
        created = _number(raw.get("created"), what, "created")
        shard_bytes = _int(raw, "shard_bytes", what, lo=1)
        state_file = raw.get("state_file")
        if not isinstance(state_file, str) or not STATE_RE.match(state_file):
            raise _fail(what, f"'state_file' {_show(state_file)} is not a state file name")
        files = _parse_files(raw.get("files"), what, state_file, shard_bytes)
        return Manifest(step=got_step, created=created or 0.0, state_file=state_file,
                        shard_bytes=shard_bytes, files=files, meta=Meta.parse(raw, what),
                        version=version)


def _parse_files(raw: Any, what: str, state_file: str, shard_bytes: int
                 ) -> tuple[FileEntry, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_FILES:
        raise _fail(what, f"'files' must be a list (got {_show(raw)})")
    files: list[FileEntry] = []
    for item in raw:
        if not isinstance(item, dict):
            raise _fail(what, f"a 'files' entry must be an object (got {_show(item)})")
        name = safe_name(item.get("name"), what)
        checksum = item.get("checksum")
        if not isinstance(checksum, str) or not _HEX128.match(checksum):
            raise _fail(what, f"{name}: 'checksum' must be 32 hex digits (got {_show(checksum)})")
        files.append(FileEntry(name, _int(item, "size", f"{what}: {name}"), checksum))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise _fail(what, "a file is listed twice")
    if state_file not in names:
        raise _fail(what, f"the state file {state_file} is not listed")
    shards = [f for f in files if f.name != state_file]
    indices = []
    for f in shards:
        match = SHARD_RE.match(f.name)
        if match is None:
            raise _fail(what, f"{f.name} is neither the state file nor a shard")
        indices.append(int(match.group(1)))
    if indices != list(range(len(shards))):
        raise _fail(what, "the shards are not numbered 0, 1, 2 ... in order")
    for i, f in enumerate(shards):
        last = i == len(shards) - 1
        if f.size > shard_bytes or (not last and f.size != shard_bytes) or f.size == 0:
            raise _fail(what, f"{f.name} has {f.size} bytes, which does not fit shards of "
                        f"{shard_bytes} bytes")
    return tuple(files)


# ----------------------------------------------------------------------------- state index


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in the stream."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.offset, self.nbytes, self.dtype, list(self.shape)]


@dataclass(frozen=True)
class StateIndex:
    """A state file: the JSON skeleton of the state and the placement of its tensors."""

    skeleton: Any
    total: int
    tensors: tuple[TensorEntry, ...]

    def to_bytes(self) -> bytes:
        return json.dumps({"skeleton": self.skeleton, "total": self.total,
                           "tensors": [e.to_json() for e in self.tensors]},
                          allow_nan=False).encode()

    @staticmethod
    def parse(data: bytes, manifest: Manifest) -> "StateIndex":
        """The state file in ``data``, checked against ``manifest`` (see the module docstring)."""
        what = "state file"
        raw = load_json(data, what, MAX_STATE_BYTES)
        if not isinstance(raw, dict) or "skeleton" not in raw:
            raise _fail(what, "must be an object with 'skeleton', 'total' and 'tensors'")
        total = _int(raw, "total", what)
        if total != manifest.total:
            raise _fail(what, f"says the tensors take {total} bytes, but the shards hold "
                        f"{manifest.total}")
        entries = raw.get("tensors")
        if not isinstance(entries, list):
            raise _fail(what, f"'tensors' must be a list (got {_show(entries)})")
        tensors = tuple(_tensor_entry(e, i, total) for i, e in enumerate(entries))
        spans = sorted((e.offset, e.offset + e.nbytes, i) for i, e in enumerate(tensors)
                       if e.nbytes)
        for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
            if start < end:
                raise _fail(what, f"tensors {i} and {j} overlap")
        check_skeleton(raw["skeleton"], tensors)
        return StateIndex(raw["skeleton"], total, tensors)


def _tensor_entry(raw: Any, index: int, total: int) -> TensorEntry:
    what = f"state file: tensor {index}"
    if not isinstance(raw, list) or len(raw) != 4:
        raise _fail(what, f"must be [offset, nbytes, dtype, shape] (got {_show(raw)})")
    offset, nbytes, dtype, shape = raw
    if dtype not in DTYPES:
        raise _fail(what, f"dtype {_show(dtype)} is not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            any(type(d) is not int or d < 0 for d in shape):
        raise _fail(what, f"shape {_show(shape)} is not a list of sizes")
    for key, value in (("offset", offset), ("nbytes", nbytes)):
        if type(value) is not int or value < 0:
            raise _fail(what, f"{key} {_show(value)} is not a size")
    numel = math.prod(shape)
    if numel * DTYPES[dtype] != nbytes:
        raise _fail(what, f"shape {shape} of {dtype} needs {numel * DTYPES[dtype]} bytes, "
                    f"not {nbytes}")
    if offset % ALIGN or offset + nbytes > total:
        raise _fail(what, f"bytes [{offset}, {offset + nbytes}) are not an aligned range inside "
                    f"the {total}-byte stream")
    return TensorEntry(offset, nbytes, dtype, tuple(shape))


def check_skeleton(skeleton: Any, tensors: tuple[TensorEntry, ...]) -> None:
    """Every tag in ``skeleton`` is well formed and every tensor index exists (iteratively)."""
    what = "state file"
    stack = [(skeleton, False)]
    while stack:
        node, as_key = stack.pop()
        if isinstance(node, list):
            stack.extend((v, as_key) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        tag = next(iter(node)) if len(node) == 1 else None
        if tag not in TAGS:
            if as_key:
                raise _fail(what, "a mapping cannot be a dictionary key")
            stack.extend((v, False) for v in node.values())
            continue
        value = node[tag]
        if tag in ("__tensor__", "__ndarray__"):
            if as_key or type(value) is not int or not 0 <= value < len(tensors):
                raise _fail(what, f"tensor reference {_show(value)} is not one of its "
                            f"{len(tensors)} tensors")
            if tag == "__ndarray__" and tensors[value].dtype not in NUMPY_DTYPES:
                raise _fail(what, f"a numpy array cannot have dtype {tensors[value].dtype}")
        elif tag == "__float__":
            if value not in ("inf", "-inf", "nan"):
                raise _fail(what, f"{_show(value)} is not a non-finite float")
        elif tag == "__tuple__":
            if not isinstance(value, list):
                raise _fail(what, "a tuple must hold a list")
            stack.extend((v, as_key) for v in value)
        else:  # __dict__: [[key, value], ...]
            if as_key or not isinstance(value, list) or \
                    any(not isinstance(p, list) or len(p) != 2 for p in value):
                raise _fail(what, "a tagged dictionary must hold [key, value] pairs")
            for key, item in value:
                stack.append((key, True))
                stack.append((item, False))


# ----------------------------------------------------------------------------- small markers


def parse_marker(data: bytes, what: str, fields: Mapping[str, type | tuple[type, ...]]
                 ) -> dict[str, Any]:
    """A small JSON object (``COMPLETE``, ``progress.json``, a lease) whose listed ``fields``
    must have the given types when present; other keys are kept as they are."""
    raw = load_json(data, what, MAX_MARKER_BYTES, max_depth=16)
    if not isinstance(raw, dict):
        raise _fail(what, f"must be a JSON object (got {type(raw).__name__})")
    for key, kind in fields.items():
        value = raw.get(key)
        if value is None:
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise _fail(what, f"{key!r} has the wrong type (got {_show(value)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(what, f"{key!r} is not finite")
    return raw
