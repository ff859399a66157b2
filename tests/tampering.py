"""Ways to tamper with a real checkpoint, as an attacker or a careless user would.

Each tamper edits the newest checkpoint of a run (step :data:`NEWEST`) through a
:class:`Tamper` context, on local disk or S3 alike. Where the manifest protects itself, the
attacker re-signs it (its checksum guards against accidents, not against someone who can write
the file), and where a state file is rewritten its size and checksum in the manifest are updated,
so that only the checks behind the checksums can catch the lie.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from distrib.checkpoint.storage import Storage

NEWEST, FALLBACK = 4, 2
STEP = f"step-{NEWEST:09d}"
_PREFIX = b'{"manifest_checksum": "'


def sign(body: Any) -> bytes:
    """A manifest file for ``body`` with a correct self-checksum (format version 2)."""
    rest = json.dumps(body, indent=1).encode()
    if not rest.startswith(b"{"):  # not an object: nothing to sign
        return rest
    rest = rest[1:]
    return _PREFIX + xxhash.xxh3_128(rest).hexdigest().encode() + b'", ' + rest


def unsign(data: bytes) -> Any:
    return json.loads(b"{" + data[len(_PREFIX) + 35:] if data.startswith(_PREFIX) else data)


@dataclass
class Tamper:
    """Read and rewrite the files of checkpoint :data:`STEP` in ``storage``."""

    storage: Storage
    outside: str  # a file outside the checkpoint root (absolute path, local runs only)

    def read(self, name: str) -> bytes:
        return self.storage.read(f"{STEP}/{name}")

    def write(self, name: str, data: bytes) -> None:
        self.storage.delete(f"{STEP}/{name}")
        self.storage.write(f"{STEP}/{name}", [data])

    def manifest(self) -> dict[str, Any]:
        return unsign(self.read("manifest.json"))  # type: ignore[no-any-return]

    def put_manifest(self, body: Any, signed: bool = True) -> None:
        self.write("manifest.json", sign(body) if signed else json.dumps(body).encode())

    def state(self) -> dict[str, Any]:
        return json.loads(self.read(self.manifest()["state_file"]))  # type: ignore[no-any-return]

    def put_state(self, state: Any, raw: bytes | None = None) -> None:
        """Rewrite the state file, with its manifest entry (size, checksum) made consistent."""
        data = raw if raw is not None else json.dumps(state).encode()
        manifest = self.manifest()
        self.write(manifest["state_file"], data)
        for f in manifest["files"]:
            if f["name"] == manifest["state_file"]:
                f["size"], f["checksum"] = len(data), xxhash.xxh3_128(data).hexdigest()
        self.put_manifest(manifest)

    def shards(self) -> list[str]:
        return [f["name"] for f in self.manifest()["files"] if f["name"].startswith("shard-")]

    def edit_manifest(self, edit: Callable[[dict[str, Any]], Any]) -> None:
        body = self.manifest()
        result = edit(body)
        self.put_manifest(body if result is None else result)

    def edit_state(self, edit: Callable[[dict[str, Any]], Any]) -> None:
        state = self.state()
        result = edit(state)
        self.put_state(state if result is None else result)


def _rename_first_shard(t: Tamper, name: str) -> None:
    body = t.manifest()
    body["files"][0]["name"] = name
    t.put_manifest(body)


def _traversal(t: Tamper) -> None:
    """A shard named ../../../../etc/passwd, with that file's real size and checksum."""
    body = t.manifest()
    target = "/etc/passwd" if os.path.exists("/etc/passwd") else t.outside
    with open(target, "rb") as fh:
        data = fh.read()
    body["files"][0].update(name="../" * 8 + target.lstrip("/"), size=len(data),
                            checksum=xxhash.xxh3_128(data).hexdigest())
    t.put_manifest(body)


def _state_elsewhere(t: Tamper) -> None:
    """The state file is another step's (a path into a sibling directory)."""
    body = t.manifest()
    other = f"../step-{FALLBACK:09d}/" + body["state_file"]
    for f in body["files"]:
        if f["name"] == body["state_file"]:
            f["name"] = other
    body["state_file"] = other
    t.put_manifest(body)


def _tensor(index: int, edit: Callable[[list[Any]], None]) -> Callable[[Tamper], None]:
    def tamper(t: Tamper) -> None:
        def change(state: dict[str, Any]) -> None:
            edit(state["tensors"][index])
        t.edit_state(change)
    return tamper


def _set(i: int, value: Any) -> Callable[[list[Any]], None]:
    def edit(entry: list[Any]) -> None:
        entry[i] = value
    return edit


def _big_tensor(entry: list[Any]) -> None:
    entry[3], entry[1], entry[2] = [250_000_000], 1_000_000_000, "float32"


def _overlap(t: Tamper) -> None:
    def change(state: dict[str, Any]) -> None:
        a, b = state["tensors"][0], state["tensors"][1]
        b[0] = a[0]  # the second tensor placed on top of the first
    t.edit_state(change)


def _flip(name_of: Callable[[Tamper], str], at: float = 0.5) -> Callable[[Tamper], None]:
    def tamper(t: Tamper) -> None:
        name = name_of(t)
        data = bytearray(t.read(name))
        data[int(len(data) * at)] ^= 0x10
        t.write(name, bytes(data))
    return tamper


def _truncate(name_of: Callable[[Tamper], str]) -> Callable[[Tamper], None]:
    def tamper(t: Tamper) -> None:
        name = name_of(t)
        t.write(name, t.read(name)[:-7])
    return tamper


def _manifest_flip_shard_bytes(t: Tamper) -> None:
    """One bit of the manifest's shard_bytes, not re-signed (an accident on disk)."""
    data = t.read("manifest.json")
    key = b'"shard_bytes": '
    at = data.index(key) + len(key)
    t.write("manifest.json", data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _model_key(t: Tamper) -> None:
    """A state that fits the format but not the model: a parameter renamed."""
    def change(state: dict[str, Any]) -> None:
        model = state["skeleton"]["model"]
        key = next(iter(model))
        model["not." + key] = model.pop(key)
    t.edit_state(change)


def _rng_garbage(t: Tamper) -> None:
    def change(state: dict[str, Any]) -> None:
        state["skeleton"]["per_rank"][0]["rng"]["python"] = "not a state"
    t.edit_state(change)


def _progress_garbage(t: Tamper) -> None:
    def change(state: dict[str, Any]) -> None:
        state["skeleton"]["progress"]["epoch"] = "abc"
    t.edit_state(change)


def _ndarray_bf16(t: Tamper) -> None:
    def change(state: dict[str, Any]) -> None:
        state["tensors"][0][2] = "bfloat16"
        state["tensors"][0][1] //= 2
        state["skeleton"]["history"] = [{"__ndarray__": 0}]
    t.edit_state(change)


def _missing_shard(t: Tamper) -> None:
    t.storage.delete(f"{STEP}/{t.shards()[-1]}")


def _duplicate_entry(t: Tamper) -> None:
    t.edit_manifest(lambda m: m["files"].append(dict(m["files"][0])))


def _lying_shard_bytes(t: Tamper) -> None:
    t.edit_manifest(lambda m: m.update(shard_bytes=m["shard_bytes"] * 2))


def _total(t: Tamper) -> None:
    t.edit_state(lambda s: s.update(total=s["total"] + 64))


def _extra_dims(entry: list[Any]) -> None:
    entry[3] = [1] * 100


TAMPERS: dict[str, Callable[[Tamper], None]] = {
    # names read from the manifest
    "traversal-etc-passwd": _traversal,
    "state-file-in-sibling-dir": _state_elsewhere,
    "absolute-name": lambda t: _rename_first_shard(t, "/etc/passwd"),
    "nul-in-name": lambda t: _rename_first_shard(t, "shard-00000-abc\x00.bin"),
    "newline-in-name": lambda t: _rename_first_shard(t, "shard-00000-abc\n.bin"),
    "dot-dot-name": lambda t: _rename_first_shard(t, ".."),
    # JSON of the wrong shape
    "manifest-is-a-list": lambda t: t.put_manifest([1, 2, 3]),
    "manifest-is-a-number": lambda t: t.put_manifest(5),
    "files-is-5": lambda t: t.edit_manifest(lambda m: m.update(files=5)),
    "size-abc": lambda t: t.edit_manifest(lambda m: m["files"][0].update(size="abc")),
    "created-yesterday": lambda t: t.edit_manifest(lambda m: m.update(created="yesterday")),
    "metric-list": lambda t: t.edit_manifest(lambda m: m.update(metric=[1, 2])),
    "version-v2": lambda t: t.edit_manifest(lambda m: m.update(version="v2")),
    "version-from-the-future": lambda t: t.edit_manifest(lambda m: m.update(version=99)),
    "step-mismatch": lambda t: t.edit_manifest(lambda m: m.update(step=FALLBACK)),
    "duplicate-file-entry": _duplicate_entry,
    "lying-shard-bytes": _lying_shard_bytes,
    "manifest-nested-100000": lambda t: t.write("manifest.json", _deep(100_000)),
    "manifest-17-MB": lambda t: t.write("manifest.json", b" " * (17 << 20) + b"{}"),
    "manifest-unsigned-bit-flip": _manifest_flip_shard_bytes,
    "manifest-truncated": _truncate(lambda t: "manifest.json"),
    # layout lies with consistent checksums
    "offset-1e15": _tensor(0, _set(0, 10**15)),
    "offset-negative": _tensor(0, _set(0, -64)),
    "offset-unaligned": _tensor(1, _set(0, 3)),
    "shape-250M": _tensor(0, _big_tensor),
    "nbytes-lie": _tensor(0, _set(1, 4)),
    "dtype-qint8": _tensor(0, _set(2, "qint8")),
    "dtype-bogus": _tensor(0, _set(2, "bogus")),
    "100-dims": _tensor(0, _extra_dims),
    "overlapping-tensors": _overlap,
    "total-lie": _total,
    "tensor-index-999": lambda t: t.edit_state(
        lambda s: s["skeleton"]["model"].update({next(iter(s["skeleton"]["model"])):
                                                 {"__tensor__": 999}})),
    "ndarray-bfloat16": _ndarray_bf16,
    "state-nested-100000": lambda t: t.put_state(None, raw=_deep(100_000)),
    # damage
    "shard-bit-flip": _flip(lambda t: t.shards()[0]),
    "state-bit-flip": _flip(lambda t: t.manifest()["state_file"], at=0.9),
    "shard-truncated": _truncate(lambda t: t.shards()[0]),
    "shard-missing": _missing_shard,
    # valid format, but not this run's state
    "model-key-renamed": _model_key,
    "rng-garbage": _rng_garbage,
    "progress-epoch-abc": _progress_garbage,
}

#: tampers the format cannot see (checksums and layout are consistent): only the trainer's check
#: of the state against its model, optimizer and own bookkeeping rejects them
SEMANTIC = {"model-key-renamed", "rng-garbage", "progress-epoch-abc"}
