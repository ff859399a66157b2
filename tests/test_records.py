"""Run records: the writer and the merging reader on local disk, memory:// and S3 (moto), the
report command's input checks, and the --tensorboard config check."""

from __future__ import annotations

import logging
import struct
import sys
import time
from pathlib import Path

import pytest

from distrib.checkpoint.storage import open_storage
from distrib.records.events import RunRecords, read_history, read_segments
from distrib.report import main as report_main
from distrib.report import summarize
from distrib.train import main as train_main
from distrib.training.early_stopping import EarlyStopping

from .conftest import REPO, base_env, run_cli
from .s3servers import s3_env


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def write_segment(url: str, start: int, last: int, *, end: str | None = None,
                  restart: bool = False, save_at: int | None = None) -> None:
    """One launch's records: a start at ``start``, steps start+1..last, an epoch at ``last``."""
    records = RunRecords.open(url, {}, rank=0, tensorboard=False, samples_per_step=32)
    records.start(step=start, epoch=0, world_size=2, restart=restart,
                  resumed_from=f"x/step-{start:09d}" if start else None)
    es = EarlyStopping(patience=3)
    for step in range(start + 1, last + 1):
        records.step(step, 0, train_loss=1.0 / step, lr=0.1, grad_norm=None)
        if step == save_at:
            records.checkpoint(step, 0.25, 1000, None)
    es.update(1.0 / last, epoch=0)
    records.epoch({"epoch": 1.0, "step": float(last), "train_loss": 0.5, "val_loss": 1.0 / last,
                   "lr": 0.1, "samples_per_s": 100.0}, es)
    if end is not None:
        records.end(end, step=last, epoch=1)
    else:
        records.close()  # a kill: no end record (close only flushes what an object store holds)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_resume_supersedes_the_replayed_steps(where: str, tmp_path: Path) -> None:
    url = str(tmp_path / "logs") if where == "local" else f"memory://records-{time.time_ns()}"
    write_segment(url, 0, 30, save_at=20)            # killed after step 30, saved at 20
    write_segment(url, 20, 45, end="preempted")      # resumed from 20, preempted at 45
    write_segment(url, 45, 60, end="finished")       # resumed from 45: nothing replayed
    history = read_history(open_storage(url))
    assert history.segments == 3
    assert [r["step"] for r in history.kind("step")] == list(range(1, 61))  # each step once
    assert [r["step"] for r in history.kind("checkpoint")] == [20]
    assert [r["step"] for r in history.kind("epoch")] == [45, 60]  # 30's epoch was replayed
    assert sorted(r["step"] for r in history.superseded if r["kind"] == "step") == \
        list(range(21, 31))
    first, second = history.kind("resume")
    assert (first["step"], first["last_step"], first["steps_replayed"]) == (20, 30, 10)
    assert first["previous_status"] is None  # the first launch ended without a word
    assert (second["step"], second["steps_replayed"], second["previous_status"]) == \
        (45, 0, "preempted")
    assert all(r["time_lost_s"] >= 0 for r in (first, second))
    summary = summarize(history)
    assert (summary.status, summary.interruptions, summary.steps_replayed) == ("finished", 2, 10)
    assert (summary.saves, summary.saving_s, summary.best_epoch) == (1, 0.25, 1)


def test_a_checkpoint_heartbeat_past_the_last_record_counts_as_replayed(tmp_path: Path) -> None:
    url = str(tmp_path / "logs")
    write_segment(url, 0, 30)
    records = RunRecords.open(url, {}, rank=0, tensorboard=False, samples_per_step=32)
    records.start(step=20, epoch=0, world_size=2, restart=False, resumed_from="x/step-20",
                  heartbeat={"step": 37, "time": time.time()})
    records.close()
    (marker,) = read_history(open_storage(url)).kind("resume")
    assert (marker["last_step"], marker["steps_replayed"]) == (37, 17)


def test_force_restart_starts_a_new_history_and_a_cut_line_is_skipped(tmp_path: Path) -> None:
    url = str(tmp_path / "logs")
    write_segment(url, 0, 30, end="finished")
    write_segment(url, 0, 10, restart=True)
    newest = max((tmp_path / "logs").glob("records-*.jsonl"), key=lambda p: p.stat().st_mtime)
    with newest.open("a") as fh:
        fh.write('{"kind": "step", "time": 1.0, "st')  # what a kill mid-line leaves
    history = read_history(open_storage(url))
    assert [r["step"] for r in history.kind("step")] == list(range(1, 11))
    assert history.kind("resume") == [] and len(history.kind("start")) == 1
    assert summarize(history, now=time.time()).status == "in progress"
    assert summarize(history, now=time.time() + 3600).status == "interrupted"


def test_records_on_s3_are_rewritten_while_the_run_goes_on(s3_url: str) -> None:
    url = s3_url + "/logs"
    records = RunRecords.open(url, {}, rank=0, tensorboard=False, samples_per_step=32)
    records.start(step=0, epoch=0, world_size=2, restart=False, resumed_from=None)
    records.step(1, 0, train_loss=0.9, lr=0.1, grad_norm=2.0)
    records.checkpoint(1, 0.5, 123, None)  # urgent: rewritten in the background at once
    storage = open_storage(url)
    deadline = time.monotonic() + 20
    while not any(r["kind"] == "checkpoint" for seg in read_segments(storage) for r in seg):
        assert time.monotonic() < deadline, "the segment never reached S3"
        time.sleep(0.05)
    records.end("finished", step=1, epoch=1)
    history = read_history(storage)
    assert [r["kind"] for r in history.records] == ["start", "step", "checkpoint", "end"]
    assert history.kind("step")[0]["grad_norm"] == 2.0


def test_write_failures_are_warnings_not_errors(moto_endpoint: str, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(key, value)
    records = RunRecords.open("s3://no-such-bucket-for-records/logs", {}, rank=0,
                              tensorboard=False, samples_per_step=32)
    with caplog.at_level(logging.WARNING, logger="distrib.records.events"):
        records.start(step=0, epoch=0, world_size=1, restart=False, resumed_from=None)
        records.step(1, 0, train_loss=float("nan"), lr=0.1, grad_norm=None)
        records.end("finished", step=1, epoch=1)
    assert any("run records: cannot write" in r.getMessage() for r in caplog.records)


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    records = RunRecords.open(str(tmp_path / "logs"), {}, rank=1, tensorboard=True,
                              samples_per_step=32)
    records.start(step=0, epoch=0, world_size=2, restart=False, resumed_from=None)
    records.end("finished", step=0, epoch=0)
    assert not records.enabled and not (tmp_path / "logs").exists()


def test_report_on_a_run_in_progress_and_bad_run_dirs(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ck"
    write_segment(str(ckpt / "logs"), 0, 30)  # no end yet: in progress
    out = tmp_path / "r.png"
    assert report_main([str(ckpt), "--out", str(out)]) == 0  # the checkpoint dir is accepted
    printed = capsys.readouterr().out
    assert "status: in progress" in printed and "30 optimizer steps" in printed
    width, height = png_size(out)
    assert 600 <= width <= 4000 and 400 <= height <= 4000
    for bad, message in ((tmp_path / "nope", "no such directory"),
                         (tmp_path, "no run records here or in its logs/")):
        assert report_main([str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_missing_optional_packages_are_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an absent package looks like
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.chdir(tmp_path)
    assert train_main(["--tensorboard", "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard: the tensorboard package is not installed" in err[0]
    assert list(tmp_path.iterdir()) == []
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    logs.mkdir()
    (logs / "records-20261121T000000.000Z-abcdef.jsonl").write_text(
        '{"kind": "start", "time": 1795000000.0, "step": 0, "epoch": 1}\n'
        '{"kind": "end", "time": 1795000060.0, "status": "finished", "step": 8, "epoch": 2}\n')
    assert report_main([str(logs)]) == 2  # the summary, then why there is no picture
    out = capsys.readouterr()
    assert "status: finished" in out.out
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "pip install 'distrib[plot]'" in err[0]
    assert report_main([str(logs), "--no-plot"]) == 0
    assert "status: finished" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_on_s3_writes_records_tensorboard_and_a_report(
        s3_url: str, moto_endpoint: str, tmp_path: Path) -> None:
    """One process, checkpoints and records on S3 (object store: segments rewritten whole,
    TensorBoard events uploaded), then the report reads them from S3."""
    env = base_env(**s3_env(moto_endpoint))
    proc = run_cli([sys.executable, "-m", "distrib.train", "--task", "tests.tasks:tiny",
                    "--max-epochs", "2", "--log-every-steps", "2", "--save-every-steps", "4",
                    "--tensorboard", "--checkpoint-dir", s3_url, "--no-progress"],
                   cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = open_storage(s3_url + "/logs")
    history = read_history(storage)
    steps = [r["step"] for r in history.kind("step")]
    assert steps == list(range(2, 2 * len(steps) + 1, 2)) and len(steps) >= 4
    assert [r["epoch"] for r in history.kind("epoch")] == [1, 2]
    assert history.status == "finished"
    assert {r["step"] for r in history.kind("checkpoint")} >= {4, 8}
    assert any(n.startswith("events.out.tfevents") for n in storage.list("tensorboard"))
    out = tmp_path / "s3.png"
    report = run_cli([sys.executable, "-m", "distrib.report", s3_url, "--out", str(out)],
                     cwd=REPO, env=env)
    assert report.returncode == 0, report.stderr
    assert "status: finished" in report.stdout and "epochs: 2" in report.stdout
    assert png_size(out)[0] >= 600
