"""``python -m distrib.ckpt``: list, verify, export, prune and inspect checkpoints.

Works on every URL the trainer accepts (local paths, ``file://``, ``s3://`` ...). A URL may name the
checkpoint directory or one ``step-N`` directory inside it (which then selects that step).

Exit codes: 0 success; 1 ``verify`` found a corrupt checkpoint; 2 bad input (a missing path, bad
credentials, a directory that holds no checkpoints, a step that does not exist).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from typing import Any, Sequence

from distrib.checkpoint import CheckpointInfo, CheckpointStore, CorruptCheckpoint
from distrib.checkpointer import retention
from distrib.config import parse_key_value
from distrib.serialization import unflatten_state
from distrib.storage import open_storage, parse_options

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
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    store = CheckpointStore(storage)
    try:
        exists = storage.exists("")
    except PermissionError as exc:
        raise UsageError(f"{storage.url}: access denied ({exc}); check the credentials") from None
    except Exception as exc:
        raise UsageError(f"{storage.url}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise UsageError(f"{storage.url}: no such directory")
    return store, step


def _infos(store: CheckpointStore) -> list[CheckpointInfo]:
    infos = store.scan()
    if not infos:
        raise UsageError(f"{store.storage.url}: not a checkpoint directory (no step-N entries)")
    return infos


def _pick(store: CheckpointStore, step: int | None, best: bool = False,
          mode_hint: str | None = None) -> CheckpointInfo:
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
    mode = (scored[-1].manifest.get("metric") or {}).get("mode", "min")
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
                status = "corrupt"
        m = info.manifest
        metric = m.get("metric") or {}
        marks = [w for w, hit in (("latest", info.step == latest),
                                  ("best", best is not None and info.step == best.step)) if hit]
        created = (datetime.datetime.fromtimestamp(float(m["created"])).isoformat(" ", "seconds")
                   if "created" in m else "-")
        rows.append((str(info.step), str(m.get("epoch", "-")),
                     f"{metric['name']}={metric['value']:.6g}" if metric else "-",
                     _size(info.size) if m else "-", created, status, ",".join(marks)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def cmd_verify(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    infos = [_pick(store, step)] if step is not None else _infos(store)
    bad = 0
    for info in infos:
        if info.status != "valid":
            print(f"{info.name}: {info.status} ({info.problem})")
            bad += info.status == "corrupt" or bool(info.manifest)
            continue
        try:
            store.verify(info)
            print(f"{info.name}: ok ({len(info.manifest['files'])} files, {_size(info.size)})")
        except CorruptCheckpoint as exc:
            print(f"{info.name}: CORRUPT: {exc}")
            bad += 1
    return 1 if bad else 0


def cmd_export(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    import torch

    info = _pick(store, step if args.step is None else args.step, best=args.best)
    if info.status != "valid":
        raise UsageError(f"{info.name} is {info.status}: {info.problem}")
    try:
        loaded = store.read(info, subtree="model")
    except CorruptCheckpoint as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    model = {k: v.contiguous() for k, v in unflatten_state(loaded.skeleton, loaded.tensors).items()}
    if args.out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UsageError("writing .safetensors needs the safetensors package "
                             "(pip install safetensors), or export to a .pt file") from None
        save_file(model, args.out, metadata={"step": str(info.step)})
    elif args.out.endswith((".pt", ".pth")):
        torch.save(model, args.out)
    else:
        raise UsageError(f"{args.out}: the output must end in .safetensors or .pt")
    print(f"exported the model of {info.name} ({len(model)} tensors) to {args.out}")
    return 0


def cmd_prune(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    infos = _infos(store)
    valid = [i for i in infos if i.status == "valid"]
    mode = ((valid[-1].manifest.get("metric") or {}).get("mode", "min")) if valid else "min"
    kept, deleted = retention(infos, args.keep_last, args.keep_best, mode)
    for info in deleted:
        print(f"{'would delete' if args.dry_run else 'deleting'} {info.name} ({info.status})")
        if not args.dry_run:
            store.delete(info)
    if not args.dry_run and valid:
        store.collect_orphans(valid[-1].step)
    print(f"kept {len(kept)}: {', '.join(i.name for i in kept) or 'none'}")
    return 0


def cmd_inspect(store: CheckpointStore, step: int | None, args: argparse.Namespace) -> int:
    info = _pick(store, step if args.step is None else args.step)
    manifest = dict(info.manifest)
    config = manifest.pop("config", None)
    print(json.dumps({"status": info.status, "problem": info.problem, "manifest": manifest},
                     indent=2, default=str))
    if config is not None:
        print("config:")
        width = max(len(k) for k in config)
        for key, value in config.items():
            print(f"  {key.replace('_', '-').ljust(width)}  {value}")
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
    if args.command == "verify" and args.step is not None:
        step_override: int | None = args.step
    else:
        step_override = None
    try:
        if args.command == "prune" and (args.keep_last < 1 or args.keep_best < 0):
            raise UsageError("--keep-last must be >= 1 and --keep-best >= 0")
        store, step = _store(args.url, args.storage_option)
        return COMMANDS[args.command](store, step_override if step_override is not None
                                      else step, args)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"{PROG} {args.command}: error: access denied: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
