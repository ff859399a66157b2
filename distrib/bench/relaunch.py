"""Figures 11 and 12: how long a relaunch takes to its first optimizer step when the state comes
from the memory tier, against the other ways it can come, on the state of figure 6 (the bench
``mlp`` with >= ``size_mb`` of parameters plus Adam state, 2 ranks of ``distrib.train``).

* 11: a whole-job relaunch (torchrun on one node) from launch to rank 0's "first optimizer step
  done": resuming from this node's memory-tier snapshot / a fresh start (no checkpoint, no
  memory tier); resuming the same state from S3 on a loopback moto server is timed beside them.
  Each side's rank 0 also reports its own start-up time (process group, model, resume, first
  step), which leaves out the launcher's and the interpreter's.
* 12: node loss: two torchrun agents ("nodes", one worker each, c10d rendezvous on loopback,
  each node its own memory directory); one node's agent and worker get a SIGKILL and a
  replacement agent with empty memory starts. Timed from starting the replacement until rank 0
  logs its first optimizer step after the restart: the state broadcast from the surviving
  peer's snapshot (memory tier on, nothing durable) / the state read from durable storage (memory
  tier off, a durable checkpoint of the same state), which is the loopback S3 server: nodes share
  no disk.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import socket
import statistics
import time
import uuid
from typing import Any

from distrib.bench.core import Figure, Settings, figure, interleave
from distrib.bench.jobs import FIRST_STEP, Launch, job_env, launcher, relaunch_args, torchrun
from distrib.bench.s3 import LoopbackS3, _free_port
from distrib.bench.spawn import Job, memory_root, prepared_checkpoint, restart_env, wait_for

FROM_MEMORY = "resuming from the memory tier"
#: figure 12's rendezvous notices a lost node after 3 s without a heartbeat (torchrun's default:
#: 15 s, in 5-s heartbeats, so 10-15 s depending on when the node died); the same on both sides
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3"
#: what rank 0 logs at its first optimizer step: the worker's own start-up time
STARTUP = re.compile(r"first optimizer step done (\d+\.\d+)s after start-up began")


def committed(pattern: str) -> bool:
    """Whether a committed checkpoint matches ``pattern`` (a ``step-N`` glob): its manifest is
    written last, and the directory gets that name only at the commit."""
    return bool(glob.glob(os.path.join(pattern, "manifest.json")))


def _snapshot_job(flags: list[str], env: dict[str, str], shm: str, log: str) -> None:
    """Train with a snapshot every step until this node's tier holds a committed one, then
    SIGKILL the job: a crashed run whose newest state is in memory only."""
    job = Job(torchrun("-m", "distrib.train", *flags), log, env)
    try:
        wait_for(lambda: committed(os.path.join(shm, "distrib-*", "step-*")), job, 600,
                 "waiting for a memory snapshot")
    finally:
        job.kill()


def figure_11(settings: Settings) -> Figure:
    """Relaunch to first step: from memory / fresh start (and from loopback S3 / fresh start)."""
    root = os.path.join(settings.workdir, "memory-relaunch")
    os.makedirs(root, exist_ok=True)
    shm = memory_root(settings)
    server = LoopbackS3()
    try:
        with server.environ():
            return _figure_11(settings, root, shm, server)
    finally:
        server.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _figure_11(settings: Settings, root: str, shm: str, server: LoopbackS3) -> Figure:
    common = relaunch_args(settings)
    memory_env = dict(job_env(), DISTRIB_RUN_ID=f"bench-memory-{uuid.uuid4().hex[:8]}")
    memory_flags = [*common, "--checkpoint-dir", os.path.join(root, "memory"),
                    "--memory-every-steps", "1", "--memory-dir", shm]
    _snapshot_job(memory_flags, memory_env, shm, os.path.join(root, "prepare.log"))

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/run"
    s3_env = dict(job_env(), **server.env)
    _, info = prepared_checkpoint(common, url, os.path.join(root, "prepare-s3.log"), s3_env)
    sources: dict[str, list[str]] = {"memory": [], "s3": []}
    startup: dict[str, list[float]] = {"memory": [], "s3": [], "fresh": []}

    def timed_launch(kind: str, flags: list[str], env: dict[str, str] | None = None) -> float:
        launch = Launch(flags, env=env)
        text = "".join(launch.lines)
        found = STARTUP.search(text)
        startup[kind].append(float(found.group(1)) if found else math.nan)
        if kind in sources:
            sources[kind].append("memory" if FROM_MEMORY in text else
                                 "s3" if f"resumed from {url}" in text else "?")
        return launch.seconds

    fresh_runs = [0]

    def fresh() -> float:
        fresh_runs[0] += 1
        where = os.path.join(root, f"fresh-{fresh_runs[0]}")
        seconds = timed_launch("fresh", [*common, "--checkpoint-dir", where])
        shutil.rmtree(where, ignore_errors=True)
        return seconds

    memory, s3, fresh_s = interleave(settings.reps, [
        lambda: timed_launch("memory", memory_flags, memory_env),
        lambda: timed_launch("s3", [*common, "--checkpoint-dir", url], s3_env), fresh])
    ok = all(s == "memory" for s in sources["memory"]) and all(s == "s3" for s in sources["s3"])
    mb = info.size / 2**20
    s3_ratio = statistics.median(s / f for s, f in zip(s3, fresh_s))
    return figure(11, [m / f for m, f in zip(memory, fresh_s)],
                  {"checkpoint_mb": round(mb, 1), "server": "moto (loopback)"},
                  {"memory_s": memory, "s3_s": s3, "fresh_s": fresh_s,
                   "s3_vs_fresh": [s / f for s, f in zip(s3, fresh_s)], "resumed_from": sources,
                   **{f"{k}_worker_startup_s": v for k, v in startup.items()}},
                  f"{mb:.0f} MB; loopback S3 / fresh start {s3_ratio:.2f}; rank 0's own start-up "
                  f"{statistics.median(startup['memory']):.1f} vs "
                  f"{statistics.median(startup['fresh']):.1f} s",
                  "" if ok else "a relaunch did not resume from where it should")


# ---------------------------------------------------------------------- figure 12

def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _after(text: str, seen: int) -> str:
    """The lines of ``text`` after its ``seen``-th first-step line (all of them for 0)."""
    lines = text.splitlines(keepends=True)
    firsts = [i for i, line in enumerate(lines) if FIRST_STEP in line]
    return "".join(lines[firsts[seen - 1] + 1:] if seen else lines)


def node_loss(settings: Settings, root: str, shm: str, name: str, peer: bool,
              server: LoopbackS3) -> dict[str, Any]:
    """Two agents; the second one's node is lost once the state it needs exists (a committed
    snapshot on the surviving node, or a committed durable checkpoint), and replaced. Returns
    the seconds from starting the replacement to rank 0's first step after it, and the resume
    line. Durable storage is the loopback S3 server (nodes share no disk), on both sides."""
    work, shm = os.path.join(root, name), os.path.join(shm, name)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    ckpt = f"s3://{bucket}/{name}"
    port = _free_port()
    flags = [*relaunch_args(settings), "--checkpoint-dir", ckpt]
    env = dict(restart_env(), **server.env)
    jobs: list[Job] = []

    def agent(node: str) -> Job:
        extra = ["--memory-every-steps", "1", "--memory-dir", os.path.join(shm, node)] if peer \
            else ["--save-every-steps", "1"]
        if peer:
            os.makedirs(os.path.join(shm, node))
        cmd = launcher("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=bench-{name}",
                       f"--rdzv-conf={RDZV_CONF}", "--max-restarts=3", "-m", "distrib.train",
                       *flags, *extra)
        jobs.append(Job(cmd, os.path.join(work, f"{node}.log"), env))
        return jobs[-1]

    os.makedirs(work)
    try:
        host = agent("host")  # it binds the rendezvous port first: the store lives with it
        wait_for(lambda: _listening(port), host, 60, "waiting for the rendezvous store")
        lost = agent("lost")
        state = os.path.join(shm, "host", "distrib-*", "step-*")
        wait_for(lambda: committed(state) if peer else f"saved to {ckpt}/step-" in host.text(),
                 host, 900, "waiting for the state to exist")
        lost.kill()
        seen = host.text().count(FIRST_STEP)
        started = time.perf_counter()
        new = agent("replacement")
        wait_for(lambda: host.text().count(FIRST_STEP) > seen or FIRST_STEP in new.text(),
                 host, 600, "waiting for the first step after the replacement")
        seconds = time.perf_counter() - started
        after = _after(host.text(), seen) + new.text()
        resumed = [line for line in after.splitlines()
                   if FROM_MEMORY in line or "resumed from" in line]
        startup = STARTUP.search(after)
    finally:
        for job in jobs:
            job.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return {"seconds": seconds, "resumed": resumed[0].split("] ")[-1] if resumed else "",
            "worker_s": float(startup.group(1)) if startup else math.nan}


def figure_12(settings: Settings) -> Figure:
    """A lost node replaced: relaunch to first step, state from the peer / from storage."""
    root = os.path.join(settings.workdir, "node-loss")
    os.makedirs(root, exist_ok=True)
    shm = memory_root(settings)
    runs: dict[str, list[dict[str, Any]]] = {"peer": [], "durable": []}
    server = LoopbackS3()

    def side(kind: str) -> float:
        runs[kind].append(node_loss(settings, root, shm, f"{kind}-{len(runs[kind])}",
                                    kind == "peer", server))
        return float(runs[kind][-1]["seconds"])

    try:
        peer, durable = interleave(settings.reps, [lambda: side("peer"),
                                                   lambda: side("durable")])
    finally:
        server.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    ok = all("broadcast from rank" in r["resumed"] for r in runs["peer"]) and \
        all("resumed from" in r["resumed"] and "memory:" not in r["resumed"]
            for r in runs["durable"])
    workers = {k: [r["worker_s"] for r in runs[k]] for k in runs}
    return figure(12, [p / d for p, d in zip(peer, durable)], {"nodes": 2, "ranks": 2},
                  {"peer_s": peer, "durable_s": durable, "peer_worker_startup_s": workers["peer"],
                   "durable_worker_startup_s": workers["durable"],
                   "peer_resumed": [r["resumed"] for r in runs["peer"]],
                   "durable_resumed": [r["resumed"] for r in runs["durable"]]},
                  f"2 nodes on loopback, durable storage on loopback S3; the restarted rank 0's "
                  f"own start-up to first step "
                  f"{statistics.median(workers['peer']):.1f} vs "
                  f"{statistics.median(workers['durable']):.1f} s", "" if ok else "a relaunch did not resume as it should")
