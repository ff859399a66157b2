"""``python -m distrib.ckpt``: list, verify, export, prune and inspect checkpoints.

Works on every URL the trainer accepts (local paths, ``file://``, ``s3://`` ...). A URL may name the
checkpoint directory or one ``step-N`` directory inside it (which then selects that step).

Everything read is untrusted: a checkpoint that breaks the format is shown as ``invalid`` with a
one-line reason (``ls -v``), never a traceback. ``export`` without ``--step`` exports the newest
checkpoint that verifies, naming each one it skips; its output is written next to the target and
renamed into place.

Exit codes: 0 success; 1 ``verify`` found an invalid checkpoint; 2 bad input (a missing path, bad
credentials, a directory that holds no checkpoints, a step that does not exist, an output that
cannot be written, a checkpoint that cannot be exported).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import uuid
from typing import Any, Sequence

import torch

from distrib.checkpoint.checkpointer import retention
from distrib.checkpoint.storage import open_storage, parse_options
from distrib.checkpoint.store import CheckpointInfo, CheckpointStore, CorruptCheckpoint
from distrib.config import parse_key_value

PROG = "python -m distrib.ckpt"


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _store(url: str, options: list[tuple[str, str]]) -> tuple[CheckpointStore, int | None]:
    """Open the store for ``url``; a trailing ``step-N`` selects that step."""
    step = None
    match = re.search(r"(?:^|/)step-(\d+)/?$", url)
    if match:
        step = int(match.group(1))
        url = url[:match.start()] or "."
    try:
        storage = open_storage(url, parse_options(dict(options)))
        exists = storage.exists("")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except TypeError as exc:
        raise UsageError(f"{url}: a --storage-option is not accepted: {exc}") from None
    except PermissionError as exc:
        raise UsageError(f"{url}: access denied ({exc}); check the credentials") from None
    except Exception as exc:  # credentials, network, a missing bucket: one line
        raise UsageError(f"{url}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise UsageError(f"{storage.url}: no such directory")
    return CheckpointStore(storage), step


def _infos(store: CheckpointStore) -> list[CheckpointInfo]:
    infos = store.scan()
    if not infos:
        raise UsageError(f"{store.storage.url}: not a checkpoint directory (no step-N entries)")
    return infos


def _pick(store: CheckpointStore, step: int | None, best: bool = False) -> CheckpointInfo:
    """The checkpoint to act on: ``step``, the best by metric, or the newest valid one."""
    infos = _infos(store)
    if step is not None:
        for info in infos:
            if info.step == step:
                return info
        raise UsageError(f"{store.storage.url}: no checkpoint at step {step} "
                         f"(have: {', '.join(str(i.step) for i in infos)})")
    valid = [i for i in infos if i.status == "valid"]
    if best:
        chosen = _best(valid)
        if chosen is None:
            raise UsageError("--best: no valid checkpoint records a monitored metric")
        return chosen
    if not valid:
        raise UsageError(f"{store.storage.url}: no valid checkpoint")
    return valid[-1]


def _best(valid: list[CheckpointInfo]) -> CheckpointInfo | None:
    scored = [i for i in valid if i.metric is not None]
    if not scored:
        return None
    metric = scored[-1].manifest.meta.metric if scored[-1].manifest else None
    mode = metric.mode if metric is not None else "min"
    return (min if mode == "min" else max)(scored, key=lambda i: i.metric)  # type: ignore[arg-type, return-value]


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def cmd_ls(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    infos = _infos(store)
    valid = [i for i in infos if i.status == "valid"]
    latest = valid[-1].step if valid else None
    best = _best(valid)
    rows = [("step", "epoch", "metric", "size", "created", "status", "")]
    for info in infos:
        if step is not None and info.step != step:
            continue
        status = info.status
        if args.verify and status == "valid":
            try:
                store.verify(info)
            except CorruptCheckpoint:
                status = "invalid"
        m = info.manifest
        metric = m.meta.metric if m is not None else None
        marks = [w for w, hit in (("latest", info.step == latest),
                                  ("best", best is not None and info.step == best.step)) if hit]
        created = (datetime.datetime.fromtimestamp(m.created).isoformat(" ", "seconds")
                   if m is not None else "-")
        value = "-" if metric is None else (f"{metric.name}={metric.value:.6g}"
                                            if metric.value is not None else f"{metric.name}=nan")
        rows.append((str(info.step), str(m.meta.epoch) if m else "-", value,
                     _size(info.size) if m else "-", created, status, ",".join(marks)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for info in infos if args.verbose else ():
        if info.problem and (step is None or info.step == step):
            print(f"{info.name}: {info.problem}")
    return 0


def cmd_verify(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    infos = [_pick(store, step)] if step is not None else _infos(store)
    bad = 0
    for info in infos:
        if info.status != "valid":
            print(f"{info.name}: {info.status} ({info.problem})")
            bad += info.committed
            continue
        try:
            store.verify(info)
            files = len(info.manifest.files) if info.manifest else 0
            print(f"{info.name}: ok ({files} files, {_size(info.size)})")
        except CorruptCheckpoint as exc:
            print(f"{info.name}: INVALID: {exc}")
            bad += 1
    return 1 if bad else 0


def cmd_export(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    out = _check_output(args.out)
    chosen = step if args.step is None else args.step
    if chosen is not None or args.best:
        candidates = [_pick(store, chosen, best=args.best)]
    else:
        candidates = [i for i in reversed(_infos(store)) if i.committed]
    model, info = None, None
    for info in candidates:
        try:
            store.verify(info)
            model = _model_state(store, info)
            break
        except CorruptCheckpoint as exc:
            if len(candidates) == 1:
                raise UsageError(f"{info.name} cannot be exported: {exc}") from None
            print(f"{PROG} export: warning: skipping {info.name}: {exc}", file=sys.stderr)
    if model is None or info is None:
        raise UsageError(f"{store.storage.url}: no checkpoint verifies")
    _write_atomically(out, model, info.step)
    print(f"exported the model of {info.name} ({len(model)} tensors) to {out}")
    return 0


def _model_state(store: CheckpointStore, info: CheckpointInfo) -> dict[str, Any]:
    model = store.read(info, subtree="model").state()
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise CorruptCheckpoint(f"{info.name}: its 'model' is not a state dict of tensors")
    return {k: v.contiguous() for k, v in model.items()}


def _check_output(out: str) -> str:
    if not out.endswith((".safetensors", ".pt", ".pth")):
        raise UsageError(f"{out or repr(out)}: the output must end in .safetensors or .pt")
    if out.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        raise UsageError("writing .safetensors needs the safetensors package "
                         "(pip install safetensors), or export to a .pt file")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise UsageError(f"{out} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: {parent} is not writable (permission denied or a "
                         "read-only file system)")
    return out


def _write_atomically(out: str, model: dict[str, Any], step: int) -> None:
    """Write next to ``out`` and rename, so that a failed export leaves nothing half-written."""
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if out.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(model, tmp, metadata={"step": str(step)})
        else:
            torch.save(model, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def cmd_prune(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    infos = _infos(store)
    valid = [i for i in infos if i.status == "valid"]
    metric = valid[-1].manifest.meta.metric if valid and valid[-1].manifest else None
    kept, deleted = retention(infos, args.keep_last, args.keep_best,
                              metric.mode if metric is not None else "min")
    for info in deleted:
        print(f"{'would delete' if args.dry_run else 'deleting'} {info.name} ({info.status})")
        if not args.dry_run and not store.delete(info):
            print(f"  skipped {info.name}: a symbolic link is never followed for deletion")
    if not args.dry_run and valid:
        store.collect_orphans(valid[-1].step)
    print(f"kept {len(kept)}: {', '.join(i.name for i in kept) or 'none'}")
    return 0


def cmd_inspect(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    info = _pick(store, step if args.step is None else args.step)
    m = info.manifest
    manifest: dict[str, Any] | None = None
    config = None
    if m is not None:
        manifest = {"step": m.step, "version": m.version, "created": m.created,
                    "state_file": m.state_file, "shard_bytes": m.shard_bytes,
                    "files": [f.to_json() for f in m.files], **m.meta.to_json()}
        config = manifest.pop("config", None)
    print(json.dumps({"status": info.status, "problem": info.problem, "manifest": manifest},
                     indent=2, default=str))
    if config:
        print("config:")
        width = max(len(str(k)) for k in config)
        for key, value in config.items():
            print(f"  {str(key).replace('_', '-').ljust(width)}  {value}")
    return 0


COMMANDS = {"ls": cmd_ls, "verify": cmd_verify, "export": cmd_export, "prune": cmd_prune,
            "inspect": cmd_inspect}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.add_argument("url", metavar="URL", help="checkpoint directory (or one step-N in it)")
        p.add_argument("--storage-option", type=parse_key_value, action="append", default=[],
                       metavar="KEY=VALUE", help="an fsspec storage option (repeatable)")
        return p

    p = command("ls", "one row per checkpoint: step, epoch, metric, size, created, status")
    p.add_argument("--verify", action="store_true", help="also check every checksum")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also say why each checkpoint that is not valid is not")
    p = command("verify", "check every checksum; exit 1 if a checkpoint is corrupt")
    p.add_argument("--step", type=int, help="only this step")
    p = command("export", "write the model weights as a state dict (.safetensors or .pt)")
    p.add_argument("out", metavar="OUT", help="output file, *.safetensors or *.pt")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--step", type=int, help="this step (default: the newest valid one)")
    group.add_argument("--best", action="store_true", help="the one with the best metric")
    p = command("prune", "delete all but the newest K (and the best K) checkpoints")
    p.add_argument("--keep-last", type=int, required=True, metavar="K")
    p.add_argument("--keep-best", type=int, default=0, metavar="K")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = command("inspect", "print the manifest and the saved configuration")
    p.add_argument("--step", type=int, help="this step (default: the newest valid one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    step_override = args.step if args.command == "verify" else None
    try:
        if args.command == "prune" and (args.keep_last < 1 or args.keep_best < 0):
            raise UsageError("--keep-last must be >= 1 and --keep-best >= 0")
        store, step = _store(args.url, args.storage_option)
        return COMMANDS[args.command](store, step_override if step_override is not None
                                      else step, args)
    except UsageError as exc:
        message = str(exc)
    except PermissionError as exc:
        message = f"access denied: {exc}"
    except OSError as exc:  # a read-only file system, a vanished directory, storage trouble
        message = f"{type(exc).__name__}: {exc.strerror or exc}"
    except Exception as exc:  # e.g. missing credentials surface on the first request
        message = f"{type(exc).__name__}: {exc}"
    print(f"{PROG} {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
