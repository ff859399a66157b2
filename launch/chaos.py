#!/usr/bin/env python3
"""Chaos test for a distrib job: SIGKILL random workers at random times, then check that the
final weights are bit-identical to an uninterrupted run of the same command.

    python launch/chaos.py [--nproc 2] [--kills 5] [--seed 0] -- [distrib.train arguments]

for example::

    python launch/chaos.py --kills 5 -- --task mypkg.mod:build --max-epochs 3 --save-every-steps 50
    python launch/chaos.py --kills 3 --script examples/own_loop.py -- --max-steps 120

It runs the job twice under ``torchrun --nproc_per_node=N``, each in a fresh checkpoint directory
under ``--workdir``: once undisturbed (the reference), and once with ``--max-restarts`` so that
torchrun restarts the workers after each kill. After every (re)start, once rank 0 logs its first
optimizer step, it waits a random time and SIGKILLs one worker process: rank 0 first (the one that
writes checkpoints and hosts the process group's store; ``--no-rank0-first`` to skip that), then
random ones. If torchrun gives up, the job is launched again (as Kubernetes would restart the
pod). Finally both final models are exported (``distrib.ckpt export``, in this process) and
compared tensor by tensor.

``--sigterm`` preempts the chaos run once before the kills, as Kubernetes does before it deletes
a pod: the run goes under ``python -m distrib.launch`` instead, gets a SIGTERM a random time after
its first step, and must exit 75 after an emergency checkpoint; the relaunch must resume at that
checkpoint with no step lost (the ``sigterm`` entry of the result).

Exit code 0 if they are bit-identical, 1 if not, 2 if a run failed. Linux only (it finds the
worker processes in /proc). Use a seed-determined task: the comparison is the whole point.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIRST_STEP = "first optimizer step done"
EMERGENCY = re.compile(r"emergency checkpoint at step (\d+)")


def log(message: str) -> None:
    print(f"[chaos] {message}", flush=True)


def descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def workers(torchrun_pid: int, marker: bytes = b"distrib.train") -> list[int]:
    """The training worker processes (the ranks) under a launcher or torchrun process: not
    torchrun itself, and not a rank's data-loader workers (forked, with the rank's command
    line)."""
    pids = []
    for pid in descendants(torchrun_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in cmd and b"torch.distributed.run" not in cmd \
                and b"distrib.launch" not in cmd:
            pids.append(pid)
    return [pid for pid in pids if _parent(pid) not in pids]


def rank_of(pid: int) -> int | None:
    """The RANK a worker process was started with (its environment in /proc)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for entry in fh.read().split(b"\0"):
                if entry.startswith(b"RANK="):
                    return int(entry[5:])
    except (OSError, ValueError):
        pass
    return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Job:
    """One torchrun process; watches its output for rank 0's first optimizer step."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log = open(log_path, "a")
        # torchrun must not share its rendezvous store with the workers, or restarted workers
        # can read the previous round's addresses (pytorch/pytorch#135712)
        env = dict(os.environ)
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, env=env)
        self.started = threading.Event()
        self.replayed: list[int] = []
        self.emergency: int | None = None  # the step of an emergency checkpoint it logged
        self.lossless: list[str] = []  # resume lines that say no steps are lost
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if FIRST_STEP in line:
                self.started.set()
            if "steps are replayed" in line:
                self.replayed.append(int(line.rsplit(" steps are replayed", 1)[0].split()[-1]))
            if "no steps are lost" in line:
                self.lossless.append(line)
            found = EMERGENCY.search(line)
            if found:
                self.emergency = int(found.group(1))


def run_job(torchrun: list[str], train_args: list[str], ckpt: Path, log_path: Path,
            kills: int, rng: random.Random, delays: tuple[float, float],
            max_relaunches: int, rank0_first: bool = True,
            script: str | None = None, sigterm: bool = False) -> dict[str, object]:
    """Run the job to completion while killing ``kills`` workers; return what happened.
    ``script``: a training script of one's own (with a --checkpoint-dir option) instead of
    ``-m distrib.train``. ``sigterm``: first preempt the job once (:func:`preempt`); the
    launcher must be ``python -m distrib.launch``, which exits 75 when preempted."""
    target = [script] if script else ["-m", "distrib.train"]
    marker = script.encode() if script else b"distrib.train"  # an argument of the rank's command
    cmd = torchrun + [*target, *train_args, "--checkpoint-dir", str(ckpt)]
    done_kills, relaunches, replayed = 0, 0, []
    preempted: dict[str, object] | None = None
    log("+ " + " ".join(cmd))
    while True:
        job = Job(cmd, log_path)
        if sigterm and preempted is None:
            preempted = preempt(job, rng, delays, log_path)
            continue
        while done_kills < kills and job.proc.poll() is None:
            if not job.started.wait(timeout=0.5):
                continue
            time.sleep(rng.uniform(*delays))
            pids = workers(job.proc.pid, marker)
            if not pids or job.proc.poll() is not None:
                break
            ranks = {pid: rank_of(pid) for pid in pids}
            first = [pid for pid, rank in ranks.items() if rank == 0]
            victim = first[0] if rank0_first and done_kills == 0 and first else rng.choice(pids)
            job.started.clear()  # the restarted workers will log their first step again
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            done_kills += 1
            log(f"kill {done_kills}/{kills}: SIGKILL rank {ranks[victim]} (pid {victim})")
        rc = job.proc.wait()
        replayed += job.replayed
        if preempted is not None and "no_steps_lost" not in preempted:  # the relaunch's resume
            job.pump.join(timeout=30)  # every line it logged has been read
            step = preempted["emergency_step"]
            preempted["no_steps_lost"] = any(re.search(rf"\bstep {step}\b", line)  # not 240
                                             for line in job.lossless)
        if rc == 0:
            return {"kills": done_kills, "relaunches": relaunches, "replayed_steps": replayed,
                    "sigterm": preempted}
        if relaunches >= max_relaunches:
            raise RuntimeError(f"the job failed (torchrun exit {rc}); see {log_path}")
        relaunches += 1
        log(f"torchrun exited {rc}: relaunching the same command ({relaunches})")


def preempt(job: Job, rng: random.Random, delays: tuple[float, float],
            log_path: Path) -> dict[str, object]:
    """Once the job's rank 0 has taken its first step, wait a random time and send the launcher
    a SIGTERM (what Kubernetes sends before it deletes a pod). It must exit 75 (preempted) after
    an emergency checkpoint; RuntimeError otherwise. The step of that checkpoint."""
    while not job.started.wait(timeout=0.5):
        if job.proc.poll() is not None:
            raise RuntimeError(f"the job ended (exit {job.proc.returncode}) before its first "
                               f"step, so it was never preempted; see {log_path}")
    time.sleep(rng.uniform(*delays))
    job.proc.send_signal(signal.SIGTERM)
    rc = job.proc.wait()
    job.pump.join(timeout=30)
    if rc != 75 or job.emergency is None:
        raise RuntimeError(f"after a SIGTERM the launcher exited {rc} (expected 75, preempted)"
                           f"{'' if job.emergency else ' with no emergency checkpoint'}; "
                           f"see {log_path}")
    log(f"SIGTERM: exit 75 after an emergency checkpoint at step {job.emergency}; "
        "relaunching the same command")
    return {"exit": rc, "emergency_step": job.emergency}


def export(ckpt: Path, out: Path) -> None:
    """``distrib.ckpt export CKPT OUT``, in this process (a process of its own would import
    torch again, for a second or two of CPU); RuntimeError if it fails."""
    import contextlib
    import io

    from distrib.ckpt import main as ckpt_main

    with contextlib.redirect_stdout(io.StringIO()):
        code = ckpt_main(["export", str(ckpt), str(out)])
    if code != 0:
        raise RuntimeError(f"distrib.ckpt export {ckpt} exited {code}")


def compare(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ (bit for bit) between two exported state dicts."""
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x.keys() != y.keys():
        return sorted(set(x) ^ set(y))
    return [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--kills", type=int, default=5, help="workers to SIGKILL (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the kill schedule")
    parser.add_argument("--min-delay", type=float, default=0.3,
                        help="seconds after a (re)start's first step before a kill, at least")
    parser.add_argument("--max-delay", type=float, default=2.0, help="... and at most")
    parser.add_argument("--rank0-first", action=argparse.BooleanOptionalAction, default=True,
                        help="make the first kill hit rank 0 (default: yes)")
    parser.add_argument("--workdir", type=Path, help="where runs and logs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--sigterm", action="store_true",
                        help="first preempt the chaos run once: it runs under python -m "
                        "distrib.launch, which must exit 75 after a SIGTERM; the relaunch must "
                        "resume at the emergency checkpoint with no step lost")
    parser.add_argument("--script", help="run this training script (one using distrib's "
                        "CheckpointManager, taking --checkpoint-dir) instead of distrib.train")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="-- followed by distrib.train (or --script) arguments")
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"] if args.train_args else []
    if "--checkpoint-dir" in train_args:
        parser.error("do not pass --checkpoint-dir: chaos uses fresh directories in --workdir")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="distrib-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]
    launcher = ([sys.executable, "-m", "distrib.launch", *torchrun[3:]] if args.sigterm
                else torchrun)  # distrib.launch exits 75 when preempted; torchrun exits 1
    rng = random.Random(args.seed)
    started = time.monotonic()
    try:
        log(f"reference run (no faults) in {work / 'reference'}")
        run_job(torchrun, train_args, work / "reference", work / "reference.log", 0, rng,
                (0, 0), 0, script=args.script)
        reference_s = time.monotonic() - started
        log(f"chaos run: {'a SIGTERM, then ' if args.sigterm else ''}{args.kills} SIGKILLs "
            f"in {work / 'chaos'}")
        chaos = run_job(launcher + [f"--max-restarts={args.kills + 2}"], train_args,
                        work / "chaos", work / "chaos.log", args.kills, rng,
                        (args.min_delay, args.max_delay), 3, args.rank0_first,
                        script=args.script, sigterm=args.sigterm)
        export(work / "reference", work / "reference.pt")
        export(work / "chaos", work / "chaos.pt")
    except RuntimeError as exc:
        log(f"FAILED: {exc}")
        return 2
    differ = compare(work / "reference.pt", work / "chaos.pt")
    result = {**chaos, "identical": not differ, "differing_tensors": differ,
              "reference_seconds": round(reference_s, 1),
              "total_seconds": round(time.monotonic() - started, 1), "workdir": str(work)}
    log(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result))
    if differ:
        log(f"FAIL: {len(differ)} tensors differ from the uninterrupted run: {differ[:5]}")
        return 1
    log(f"PASS: after {chaos['kills']} SIGKILLs and {chaos['relaunches']} relaunches the final "
        "weights are bit-identical to the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
