"""Run records of real interrupted 2-rank jobs under torchrun: one history without duplicate
steps, a resume marker that counts the replayed steps, TensorBoard events with the same scalars,
and a report PNG."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distrib.checkpoint.storage import open_storage
from distrib.records.events import read_history

from .conftest import REPO, run_cli
from .test_records import png_size
from .test_resume_e2e import ENV, Job, launch, rank_pid

pytestmark = pytest.mark.slow

JOB = ["--task", "tests.tasks:tiny", "--task-arg", "train=8000", "--max-epochs", "2",
       "--no-early-stop", "--batch-size", "16", "--save-every-steps", "100", "--no-progress",
       "--log-every-steps", "1", "--tensorboard"]  # 250 steps per epoch with 2 ranks


def raw_segments(logs: Path) -> list[list[dict[str, Any]]]:
    """The segment files as written, parsed without the reader under test."""
    out = []
    for path in sorted(logs.glob("records-*.jsonl")):
        out.append([json.loads(line) for line in path.read_text().splitlines()])
    return sorted(out, key=lambda records: records[0]["time"])


def report(run_dir: Path, out: Path) -> str:
    proc = run_cli([sys.executable, "-m", "distrib.report", str(run_dir), "--out", str(out)],
                   cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    width, height = png_size(out)
    assert 600 <= width <= 4000 and 400 <= height <= 4000
    return proc.stdout


def test_worker_killed_records_one_history_with_a_resume_marker(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    job = Job(launch(ckpt, "--standalone", "--nproc_per_node=2", "--max-restarts=1", job=JOB),
              tmp_path / "log")
    job.wait_started()
    deadline = time.monotonic() + 60
    while not list(ckpt.glob("step-*/manifest.json")):  # at least one checkpoint to resume
        assert time.monotonic() < deadline and job.proc.poll() is None, job.text()[-2000:]
        time.sleep(0.02)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    assert job.finish() == 0, job.text()[-3000:]
    text = job.text()
    resumed = int(re.search(r"resumed from .*step-(\d+)", text).group(1))  # type: ignore[union-attr]
    final = int(re.search(r"training finished after 2 epochs, (\d+) steps", text).group(1))  # type: ignore[union-attr]

    first, second = raw_segments(ckpt / "logs")
    reached = max(r["step"] for r in first if r["kind"] == "step")  # what the killed run did
    assert reached >= resumed
    marker = next(r for r in second if r["kind"] == "resume")
    assert marker["step"] == resumed
    assert marker["steps_replayed"] == reached - resumed
    assert marker["time_lost_s"] > 0

    history = read_history(open_storage(str(ckpt / "logs")))
    steps = history.kind("step")
    assert [r["step"] for r in steps] == list(range(1, final + 1))  # each step exactly once
    assert [r["epoch"] for r in history.kind("epoch")] == [1, 2]
    replayed = {r["step"]: r["train_loss"] for r in history.superseded if r["kind"] == "step"}
    assert sorted(replayed) == list(range(resumed + 1, reached + 1))
    # exact resume: the replayed steps ran the same trajectory again
    assert all(replayed[r["step"]] == r["train_loss"] for r in steps if r["step"] in replayed)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, final + 1))  # purge_step dropped replays
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in steps], rel=1e-6)
    val = events.Scalars("epoch/val_loss")
    assert [e.value for e in val] == pytest.approx(
        [r["val_loss"] for r in history.kind("epoch")], rel=1e-6)

    printed = report(ckpt, tmp_path / "report.png")
    assert "status: finished" in printed
    assert f"interruptions survived: 1 ({reached - resumed} steps replayed" in printed


def test_preempted_run_reports_as_interrupted_then_resumes_without_replay(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    one_epoch = JOB + ["--max-epochs", "1"]
    job = Job(launch(ckpt, "--standalone", "--nproc_per_node=2", launcher="distrib.launch",
                     job=one_epoch), tmp_path / "log1")  # the launcher passes exit code 75 on
    job.wait_started()
    time.sleep(0.3)
    os.kill(job.proc.pid, signal.SIGTERM)
    assert job.finish() == 75, job.text()[-3000:]
    step = int(re.search(r"emergency checkpoint at step (\d+)", job.text()).group(1))  # type: ignore[union-attr]
    printed = report(ckpt, tmp_path / "interrupted.png")
    assert "status: preempted" in printed and "interruptions survived: 0" in printed

    again = Job(launch(ckpt, "--standalone", "--nproc_per_node=2", job=one_epoch),
                tmp_path / "log2")
    assert again.finish() == 0, again.text()[-3000:]
    history = read_history(open_storage(str(ckpt / "logs")))
    (marker,) = history.kind("resume")
    assert (marker["step"], marker["steps_replayed"], marker["previous_status"]) == \
        (step, 0, "preempted")
    assert [r["step"] for r in history.kind("step")] == list(range(1, 251))
    assert history.status == "finished"
