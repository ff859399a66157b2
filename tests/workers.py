"""Per-rank programs for the multi-process tests: ``python tests/workers.py SCENARIO OUT_DIR ARGS``.

Each process is one rank of a real gloo job (RANK, WORLD_SIZE, MASTER_* set by the test). A
scenario writes what it observed to ``OUT_DIR/rank<R>.json`` (and tensors to ``.pt`` files).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from distrib import Callback, Config, Trainer
from distrib.runtime import dist  # noqa: E402
from distrib.tasks import build_task  # noqa: E402
from distrib.training.sampler import ResumableSampler  # noqa: E402


class CommHookCounter(Callback):
    """Counts DDP gradient all-reduces (bucket hooks) and records the count at each step end."""

    def __init__(self) -> None:
        self.calls = 0
        self.at_step: list[int] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects non-GradBucket hints
            self.calls += 1
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, hook)  # type: ignore[operator]

    def on_step_end(self, trainer: Trainer) -> None:
        self.at_step.append(self.calls)


class Trace(Callback):
    """Records per-epoch metrics, learning rate and early-stopping state on every rank, and
    optionally the weights at the end of every epoch (``snapshot_prefix``)."""

    def __init__(self, snapshot_prefix: Path | None = None) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.snapshot_prefix = snapshot_prefix
        self.resumed_at: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        es = trainer.early_stopping
        self.resumed_at = {"epoch": trainer.epoch, "step": trainer.global_step,
                           "wait": es.wait_count}

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        es = trainer.early_stopping
        self.epochs.append({"metrics": metrics, "lr": trainer.optimizer.param_groups[0]["lr"],
                            "wait": es.wait_count, "best": es.best, "stopped": es.stopped,
                            "step": trainer.global_step})
        if self.snapshot_prefix is not None:
            torch.save(trainer.module.state_dict(),
                       f"{self.snapshot_prefix}-epoch{trainer.epoch + 1}-rank{dist.rank()}.pt")


class RaiseAtStep(Callback):
    """Raise at the end of optimizer step ``step`` on ``rank`` (None: on every rank)."""

    def __init__(self, rank: int | None, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, trainer: Trainer) -> None:
        if self.rank in (None, dist.rank()) and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


def save_output(out_dir: Path, data: dict[str, Any]) -> None:
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(data, default=float))


def scenario_fit(out_dir: Path, args: dict[str, Any]) -> None:
    """Run one or more trainings in one process group; record results and final weights."""
    info, _ = dist.setup(float(args.get("timeout", 60)))
    report: dict[str, Any] = {"runs": []}
    for i, argv in enumerate(args["runs"]):
        config = Config.from_args(argv)
        counter = CommHookCounter()
        trace = Trace(out_dir / f"run{i}" if args.get("snapshots") else None)
        callbacks: list[Callback] = [trace]
        if args.get("comm_hook"):
            callbacks.append(counter)
        if "raise_at" in args:
            callbacks.append(RaiseAtStep(*args["raise_at"]))
        result = Trainer(config, callbacks=callbacks).fit()
        assert result.model is not None
        torch.save(result.model.state_dict(), out_dir / f"run{i}-rank{info.rank}.pt")
        report["runs"].append({"stop_reason": result.stop_reason, "epochs": result.epochs,
                               "global_step": result.global_step, "history": result.history,
                               "hook_at_step": counter.at_step, "trace": trace.epochs,
                               "best_epoch": result.best_epoch, "message": result.message,
                               "resumed_at": trace.resumed_at})
    report["group_alive_after_fit"] = tdist.is_initialized()
    save_output(out_dir, report)
    dist.barrier()
    dist.teardown(graceful=True)


def scenario_exact_eval(out_dir: Path, args: dict[str, Any]) -> None:
    """Compare Trainer.evaluate() on 2 ranks with one process evaluating the whole set."""
    info, _ = dist.setup(60.0)
    config = Config.from_args(args["argv"])
    trainer = Trainer(config)
    trainer.info = info
    trainer.task = build_task(config)
    trainer._build_model(trainer.task)
    got = trainer.evaluate()
    task = trainer.task
    model = trainer.module.eval()
    x = torch.stack([task.val_dataset[i][0] for i in range(len(task.val_dataset))])
    y = torch.stack([task.val_dataset[i][1] for i in range(len(task.val_dataset))])
    with torch.no_grad():
        out = model(x)
        expected = {"val_loss": float(task.loss_fn(out, y)),
                    "val_accuracy": float(task.metrics["accuracy"](out, y).double().mean())}
        # What a DistributedSampler-padded evaluation would report on this rank's padded shard
        padded = ResumableSampler(len(y), num_replicas=dist.world_size(), rank=dist.rank(),
                                  shuffle=False, pad=True)
        idx = torch.tensor(list(padded))
        local = float(task.loss_fn(out[idx], y[idx])) * len(idx)
        naive = dist.all_reduce_sum([local, float(len(idx))])
    save_output(out_dir, {"got": got, "expected": expected, "naive_val_loss": naive[0] / naive[1],
                          "local_count": len(list(ResumableSampler(
                              len(y), num_replicas=dist.world_size(), rank=dist.rank(),
                              shuffle=False, pad=False)))})
    dist.barrier()
    dist.teardown(graceful=True)


def scenario_agreement(out_dir: Path, args: dict[str, Any]) -> None:
    """Call LaggedAgreement.exchange once per simulated step (rank-dependent step times); one
    rank raises a flag at one call. Record which calls were due and what was agreed when."""
    import time

    dist.setup(60.0)
    agreement = dist.LaggedAgreement(2, target_seconds=args["target"])
    sleep = args["sleep"][dist.rank()]
    seen, intervals = [], []
    for call in range(args["calls"]):
        time.sleep(sleep)
        raise_now = dist.rank() == args["raise_rank"] and call == args["raise_at"]
        agreed = agreement.exchange([False, raise_now])
        intervals.append(agreement.interval)
        if any(agreed):
            seen.append([call, agreed])
    seen.append(["drain", agreement.drain()])
    save_output(out_dir, {"seen": seen, "intervals": intervals})
    dist.barrier()
    dist.teardown(graceful=True)


def scenario_resume_each(out_dir: Path, args: dict[str, Any]) -> None:
    """Resume each of ``urls`` in turn (tampered checkpoint directories) in one process group;
    record where each run started, where it ended, and any path the storage layer resolved
    outside the directory."""
    import os

    from distrib.checkpoint.storage import FsspecStorage, LocalStorage, open_storage

    os.environ.update(args.get("env") or {})
    resolved: list[str] = []
    for cls in (LocalStorage, FsspecStorage):
        def spy(self: Any, rel: str, _original: Any = cls._path) -> str:
            path = _original(self, rel)
            resolved.append(path)
            return str(path)
        cls._path = spy  # type: ignore[method-assign]
    dist.setup(120.0)
    runs, outside = [], []
    for url in args["urls"]:
        storage = open_storage(url)
        root = storage.root  # type: ignore[attr-defined]
        resolved.clear()
        start: dict[str, int] = {}

        class Start(Callback):
            def on_fit_start(self, trainer: Trainer) -> None:
                start["step"] = trainer.global_step  # noqa: B023 (called within this iteration)

        try:
            result = Trainer(Config.from_args(args["argv"] + ["--checkpoint-dir", url]),
                             callbacks=[Start()]).fit()
            runs.append({"start": start.get("step"), "global_step": result.global_step,
                         "error": None})
        except Exception as exc:  # every rank raises alike: record it and go on
            runs.append({"start": start.get("step"), "global_step": None,
                         "error": f"{type(exc).__name__}: {exc}"})
        outside += [p for p in resolved if p != root and not p.startswith(root.rstrip("/") + "/")]
    save_output(out_dir, {"runs": runs, "outside": outside})
    dist.barrier()
    dist.teardown(graceful=True)


def scenario_fit_loop(out_dir: Path, args: dict[str, Any]) -> None:
    """``args["runs"]`` two-rank trainings through the Python API, each in a forked child that
    creates and destroys its own process group in ``fit()`` and then exits the normal way
    (interpreter finalization, where the abort of issue 12 item 13 happened). Iteration ``i``
    meets its peer at the TCPStore on ``args["ports"][i]``, hosted by the test (as torchrun's
    agent hosts it). A child exits 3 if the group outlived ``fit()``; the parent records every
    child's exit code. ``args["prewarm"]`` imports torch._dynamo (1.5 s, which DDP would import
    in every child) once in the parent; it also imports torch.distributed.nn.functional before
    any group exists, so a run without it is what shows whether distrib does that itself.
    Linux only (fork)."""
    import gc
    import traceback
    import weakref

    if args.get("prewarm"):
        import torch._dynamo  # noqa: F401
    gc.freeze()  # the children's final collection skips the inherited heap (exit: 1.4 s -> 0.4 s)

    codes: dict[int, int] = {}
    alive: list[tuple[int, int]] = []  # (run, pid): two runs at a time overlap exit and start
    for i, port in enumerate(args["ports"]):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
                groups: list[Any] = []

                class Watch(Callback):
                    def on_fit_start(self, trainer: Trainer) -> None:
                        groups.append(weakref.ref(tdist.group.WORLD))  # noqa: B023

                config = Config.from_args([
                    "--task", "tests.tasks:tiny", "--max-epochs", "1", "--no-progress",
                    "--batch-size", "32", "--log-level", "warning",
                    "--checkpoint-dir", str(out_dir / f"ck{i}")])
                trainer = Trainer(config, callbacks=[Watch()])  # stays referenced, as in a script
                trainer.fit()
                gc.collect()
                if groups[0]() is not None:
                    print(f"run {i}: the process group outlived fit()", file=sys.stderr)
                    code = 3
            except BaseException:
                traceback.print_exc()
                code = 4
            sys.exit(code)  # unwinds to the interpreter: a normal exit, finalization included
        alive.append((i, pid))
        while len(alive) >= 2 or (alive and i == len(args["ports"]) - 1):
            run, child = alive.pop(0)
            codes[run] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    save_output(out_dir, {"codes": [codes[i] for i in sorted(codes)]})


def scenario_interrupted(out_dir: Path, args: dict[str, Any]) -> None:
    """For each of ``cases`` (an argv without --checkpoint-dir): an uninterrupted run, then a
    run that raises on every rank at the end of step ``raise_at`` (after an earlier
    --save-every-steps checkpoint) and a second fit() on its checkpoint directory (with
    ``resume_extra`` arguments added). Records
    whether the two runs' final weights are bit-identical, and where the resumed one started."""
    dist.setup(float(args.get("timeout", 120)))
    report = []
    for i, argv in enumerate(args["cases"]):
        ref = Trainer(Config.from_args(argv + ["--checkpoint-dir", str(out_dir / f"ref{i}")])).fit()
        config = Config.from_args(argv + ["--checkpoint-dir", str(out_dir / f"ck{i}")])
        try:
            Trainer(config, callbacks=[RaiseAtStep(None, args["raise_at"])]).fit()
            raised = False
        except RuntimeError:
            raised = True
        trace = Trace()
        again = Config.from_args(argv + args.get("resume_extra", [])
                                 + ["--checkpoint-dir", str(out_dir / f"ck{i}")])
        resumed = Trainer(again, callbacks=[trace]).fit()
        assert ref.model is not None and resumed.model is not None
        a, b = ref.model.state_dict(), resumed.model.state_dict()
        report.append({"raised": raised, "identical": all(torch.equal(a[k], b[k]) for k in a),
                       "steps": [ref.global_step, resumed.global_step],
                       "history": [ref.history, resumed.history],
                       "resumed_at": trace.resumed_at})
    save_output(out_dir, {"cases": report})
    dist.barrier()
    dist.teardown(graceful=True)


SCENARIOS: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "interrupted": scenario_interrupted,
    "resume_each": scenario_resume_each,
    "fit": scenario_fit,
    "fit_loop": scenario_fit_loop,
    "exact_eval": scenario_exact_eval,
    "agreement": scenario_agreement,
}

if __name__ == "__main__":
    from distrib import setup_logging

    setup_logging()  # log lines as the command line prints them (the tests read some)
    name, out, raw = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    SCENARIOS[name](out, json.loads(raw))
