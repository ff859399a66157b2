"""The memory tier (distrib.checkpoint.memory): snapshots in node-local shared memory, two
alternating slots, one run's only, verified like durable checkpoints; resume takes the newest
state of any tier and node. In-process loops here; real torchrun worker SIGKILLs and a lost and
replaced node in the slow tests at the end."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib import CheckpointManager
from distrib.checkpoint.interval import AutoInterval, young_daly_steps
from distrib.checkpoint.memory import tier_path
from distrib.checkpoint.serialization import TensorSource, plan_layout
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore, CorruptCheckpoint
from distrib.records.events import estimate_mtbf, observed_failures

from .conftest import REPO, LoggedJob, free_port, wait_listening
from .test_own_loop import _loop
from .test_resume_e2e import ENV, JOB, assert_identical, export, launch, rank_pid


@pytest.fixture(autouse=True)
def _run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRIB_RUN_ID", "run-a")  # the same run across the in-process launches


def _tier(shm: Path, ck: Path, run: str = "run-a") -> Path:
    from distrib.checkpoint.storage import open_storage

    return Path(tier_path(str(shm), open_storage(str(ck)).url, f"DISTRIB_RUN_ID={run}"))


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in model.state_dict().values()]


def _crash(directory: Path, shm: Path, stop_at: int, **kw: object) -> torch.nn.Module:
    """Train to ``stop_at`` with snapshots every 2 steps, then stop without finish() (the
    background writers are waited for, as a crash after them would leave things)."""
    model, manager = _loop(directory, 30, stop_at=stop_at, memory_every_steps=2,
                           memory_dir=str(shm), log_dir=None, lease_timeout=0, **kw)
    manager.close("failed")
    return model


def _resumed(directory: Path, shm: Path, **kw: object) -> CheckpointManager:
    """The objects of ``_loop``, resumed (and nothing trained)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)
    manager = CheckpointManager(str(directory), {"model": model, "optimizer": optimizer,
                                                 "scheduler": scheduler},
                                handle_signals=False, memory_every_steps=2, memory_dir=str(shm),
                                log_dir=None, lease_timeout=0, **kw)  # type: ignore[arg-type]
    manager.resume()
    return manager


def test_a_crashed_loop_resumes_from_memory_bit_identical(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    ref, m = _loop(tmp_path / "ref", 30)
    m.close()
    _crash(tmp_path / "ck", shm, stop_at=17)
    slots = sorted(p.name for p in _tier(shm, tmp_path / "ck").glob("step-*"))
    assert slots == ["step-000000014", "step-000000016"]  # two slots, the newest two
    assert not list((tmp_path / "ck").glob("step-*"))  # no durable checkpoint: memory only
    again, m = _loop(tmp_path / "ck", 30, memory_every_steps=2, memory_dir=str(shm),
                     log_dir=None, lease_timeout=0)
    m.close()
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref), _weights(again)))
    assert not _tier(shm, tmp_path / "ck").exists()  # the run completed: snapshots removed


def test_the_resume_names_the_memory_tier_and_reads_no_durable_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    _crash(tmp_path / "ck", shm, stop_at=8, save_every_steps=3)  # durable 3, 6; memory 6, 8
    durable = tmp_path / "ck" / "step-000000006"
    for shard in durable.glob("shard-*"):  # a durable read would now fail verification
        shard.write_bytes(b"\0" * shard.stat().st_size)
    caplog.set_level(logging.INFO)
    _, m = _loop(tmp_path / "ck", 9, memory_every_steps=2, memory_dir=str(shm), log_dir=None,
                 lease_timeout=0, save_every_steps=3)
    m.close()
    assert "resuming from the memory tier: step 8 (each node's own snapshot" in caplog.text
    assert "skipping checkpoint" not in caplog.text  # the damaged durable one was never read


def test_durable_checkpoints_are_persisted_from_the_snapshot_and_resume_bit_identical(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shm, ck = tmp_path / "shm", tmp_path / "ck"
    shm.mkdir()
    ref, m = _loop(tmp_path / "ref", 30)
    m.close()
    caplog.set_level(logging.DEBUG, logger="distrib.checkpoint.checkpointer")
    _crash(ck, shm, stop_at=9, save_every_steps=3)  # memory every 2, and at each durable save
    for step in (3, 6, 9):
        assert f"checkpoint step {step} persisted from memory:" in caplog.text
    durable = CheckpointStore(LocalStorage(str(ck))).inspect(9)
    snapshot = CheckpointStore(LocalStorage(str(_tier(shm, ck)))).inspect(9)
    assert durable.manifest is not None and snapshot.manifest is not None
    assert [f.checksum for f in durable.manifest.shards] == \
        [f.checksum for f in snapshot.manifest.shards]
    shutil.rmtree(_tier(shm, ck))  # the whole job lost: only the durable tier is left
    again, m = _loop(ck, 30, memory_every_steps=2, memory_dir=str(shm), log_dir=None,
                     lease_timeout=0, save_every_steps=3)
    m.close()
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref), _weights(again)))


def test_a_copy_that_differs_from_its_source_checksums_is_never_committed(
        tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    tensors = [torch.arange(100, dtype=torch.float32)]
    layout = plan_layout(tensors)
    with pytest.raises(CorruptCheckpoint, match="differ from their source"):
        store.write(1, TensorSource(tensors, layout), layout, {"__tensor__": 0}, {},
                    expected=["0" * 32])
    assert not store.scan() and not list(tmp_path.iterdir())


def test_snapshot_shards_are_mapped_only_as_regular_files_of_their_listed_size(
        tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"x" * 8)
    (tmp_path / "tier").mkdir()
    (tmp_path / "tier" / "shard").write_bytes(b"y" * 8)
    (tmp_path / "tier" / "link").symlink_to(tmp_path / "outside")
    local = LocalStorage(str(tmp_path / "tier"))
    mapped = local.map("shard", 8)
    assert mapped is not None and mapped[:] == b"y" * 8
    mapped.close()
    with pytest.raises(OSError):  # a link in the tier is never followed
        local.map("link", 8)
    with pytest.raises(OSError, match="8 bytes, expected 9"):
        local.map("shard", 9)


def test_a_damaged_snapshot_falls_back_to_the_other_slot_then_to_durable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    ck = tmp_path / "ck"
    _crash(ck, shm, stop_at=8, save_every_steps=3)  # durable 3, 6; memory 6, 8
    tier = _tier(shm, ck)
    shard = next((tier / "step-000000008").glob("shard-*"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO)
    manager = _resumed(ck, shm)
    assert manager.step == 6 and "skipping memory snapshot" in caplog.text
    assert "resuming from the memory tier: step 6" in caplog.text
    manager.close("failed")
    (tier / "step-000000006" / "manifest.json").write_text("{")  # half-written: no manifest
    caplog.clear()
    manager = _resumed(ck, shm)
    assert manager.step == 6 and "resuming from the memory tier" not in caplog.text
    assert "skipping memory snapshot" in caplog.text  # both slots; the durable step 6 is used
    manager.close("failed")


def test_another_runs_snapshot_is_never_used(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    _crash(tmp_path / "ck", shm, stop_at=9)
    monkeypatch.setenv("DISTRIB_RUN_ID", "run-b")  # another job with the same directory
    m = _resumed(tmp_path / "ck", shm)
    assert m.step == 0  # run-a's snapshots are not this run's
    m.close("failed")
    monkeypatch.setenv("DISTRIB_RUN_ID", "run-a")
    owner = _tier(shm, tmp_path / "ck") / "owner.json"
    owner.write_text(json.dumps({"run": "DISTRIB_RUN_ID=run-x", "durable": "elsewhere"}))
    caplog.set_level(logging.INFO)
    m = _resumed(tmp_path / "ck", shm)
    assert m.step == 0 and "belongs to another run" in caplog.text
    m.close("failed")
    for hostile in ("[" * 4000, "x" * 5000):  # nested past the recursion limit; too long
        owner.write_text(hostile)
        caplog.clear()
        m = _resumed(tmp_path / "ck", shm)
        assert m.step == 0 and "belongs to another run" in caplog.text
        m.close("failed")


def test_too_little_shared_memory_warns_and_runs_durable_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        caplog.set_level(logging.INFO)
        _, m = _loop(tmp_path / "ck", 6, memory_every_steps=2, memory_dir=str(small),
                     log_dir=None, lease_timeout=0)
        m.close()
        assert "memory tier off on this node" in caplog.text and "durable checkpoints only" \
            in caplog.text
        assert list((tmp_path / "ck").glob("step-*"))  # the durable tier still works
        assert not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_missing_memory_directory_warns_once(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _, m = _loop(tmp_path / "ck", 4, memory_every_steps=2, memory_dir=str(tmp_path / "none"),
                 log_dir=None, lease_timeout=0)
    m.close()
    assert caplog.text.count("memory tier off on this node") == 1
    assert not (tmp_path / "none").exists()


def test_young_daly_interval() -> None:
    # sqrt(2 x 0.1 s x 3600 s) = 26.8 s, at 0.5 s per step: 54 steps
    assert young_daly_steps(0.1, 0.5, 3600.0) == 54
    assert young_daly_steps(0.0, 0.5, 3600.0) == 1
    assert young_daly_steps(10.0, 1e-9, 1e9, most=1000) == 1000


def test_auto_intervals_are_smoothed_held_within_a_quarter_and_never_let_writes_queue() -> None:
    auto = AutoInterval("checkpoint", 10, mtbf_seconds=3600.0)
    assert auto.update(0.1, 0.5) == 54  # Young/Daly as above
    assert auto.update(0.1, 0.45) == 54  # 56 after smoothing: within a quarter, kept
    assert auto.update(0.0, -1.0) == 54  # not a measurement
    slow_writes = AutoInterval("checkpoint", 10, mtbf_seconds=1.0)
    assert slow_writes.update(0.001, 0.1, write_seconds=4.0) == 60  # 1.5 x 4 s / 0.1 s


def test_the_failures_in_the_run_records_set_the_expected_time_between_failures() -> None:
    def launch(start: float, end: float, status: str | None) -> list[dict[str, object]]:
        last = {"kind": "end", "time": end, "status": status} if status else {
            "kind": "step", "time": end}
        return [{"kind": "start", "time": start}, last]
    segments = [launch(0, 100, None), launch(110, 300, "failed"), launch(310, 400, "preempted"),
                launch(410, 500, "finished")]
    assert observed_failures(segments) == (470.0, 2)  # killed silently, and failed
    assert estimate_mtbf((470.0, 2), 3600.0) == pytest.approx((470 + 3600) / 3)
    assert estimate_mtbf((0.0, 0), 3600.0) == 3600.0


def test_auto_durable_interval_is_chosen_from_the_measured_cost_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ref, m = _loop(tmp_path / "ref", 40)
    m.close()
    # an expected time between failures so long that the chosen interval is far from the first
    # one (10) however long this machine's steps and saves take (with 1 s, a loaded machine's
    # slow steps made Young/Daly choose about 10 again, so nothing changed and nothing was logged)
    _, m = _loop(tmp_path / "ck", 40, stop_at=35, save_every_steps="auto", lease_timeout=0,
                 mtbf_seconds=1e6)
    m.close("failed")
    chosen = re.findall(r"checkpoint every (\d+) steps \(auto: stall", caplog.text)
    assert chosen, caplog.text  # re-chosen from the first save's measurements, and logged
    assert list((tmp_path / "ck").glob("step-*"))
    caplog.clear()
    again, m = _loop(tmp_path / "ck", 40, save_every_steps="auto", lease_timeout=0,
                     mtbf_seconds=1.0)
    m.close()
    # the crash is in the records: it moves the estimate (35 s of running, one failure)
    assert "1 failure(s)" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref), _weights(again)))


def test_bad_memory_flags_are_one_line_errors(tmp_path: Path) -> None:
    for flag in (["--memory-every-steps", "sometimes"], ["--memory-every-steps", "-3"],
                 ["--mtbf-hours", "0"], ["--save-every-steps", "often"],
                 ["--save-every-steps", "-1"], ["--save-every-steps", "\u00b2"],
                 ["--memory-every-steps", "9" * 5000]):
        proc = subprocess.run([sys.executable, "-m", "distrib.train", *flag], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and flag[0] in proc.stderr


# ---------------------------------------------------------------------- real processes

TINY = [a for a in JOB]
TINY[TINY.index("--save-every-steps") + 1] = "0"  # durable checkpoints at epoch ends only


def _snapshot_steps(shm: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in shm.glob("distrib-*/step-*"))


@pytest.mark.slow
def test_worker_sigkill_resumes_from_memory_with_no_storage_read(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    proc = subprocess.run(launch(ref, "--standalone", "--nproc_per_node=2", job=TINY),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shm = tmp_path / "shm"
    shm.mkdir()
    job = LoggedJob(launch(tmp_path / "ck", "--standalone", "--nproc_per_node=2",
                           "--max-restarts=3", job=TINY + ["--memory-every-steps", "5",
                                                           "--memory-dir", str(shm)]),
                    tmp_path / "log")
    deadline = time.monotonic() + 120
    while max(_snapshot_steps(shm), default=0) < 40:
        assert time.monotonic() < deadline and job.proc.poll() is None, job.text()[-3000:]
        time.sleep(0.05)
    assert not list((tmp_path / "ck").glob("step-*"))  # nothing durable yet
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    assert job.finish() == 0, job.text()[-3000:]
    text = job.text()
    resumed = re.search(r"resuming from the memory tier: step (\d+) \(each node's own", text)
    assert resumed and int(resumed.group(1)) >= 40, text[-3000:]
    assert re.search(r"resumed from memory:\S+/step-\d+: epoch 1", text)
    assert not list(shm.iterdir())  # the run completed: its snapshots are gone
    assert_identical(export(ref, tmp_path / "ref.pt"), export(tmp_path / "ck", tmp_path / "m.pt"))


@pytest.mark.slow
def test_a_replaced_node_gets_the_state_from_its_peer(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes", one worker each, each with its own shared memory); one node
    is lost (agent and worker SIGKILLed) and replaced by a node with empty memory. The survivor's
    snapshot is newer than anything durable, so the replacement receives it by broadcast."""
    ref = tmp_path / "ref"
    proc = subprocess.run(launch(ref, "--standalone", "--nproc_per_node=2", job=TINY),
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()

    def agent(shm: Path, log: str) -> LoggedJob:
        shm.mkdir()
        return LoggedJob(launch(tmp_path / "ck", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                "--rdzv-id=peer", "--max-restarts=3",
                                job=TINY + ["--memory-every-steps", "5",
                                            "--memory-dir", str(shm)]), tmp_path / log)

    host = agent(tmp_path / "shm-host", "host.log")
    wait_listening(port, host)  # the host's agent holds the rendezvous store: the other is lost
    other = agent(tmp_path / "shm-other", "other.log")
    deadline = time.monotonic() + 120
    while max(_snapshot_steps(tmp_path / "shm-other"), default=0) < 40:
        assert time.monotonic() < deadline, host.text()[-2000:] + other.text()[-2000:]
        time.sleep(0.05)
    from .conftest import chaos

    for pid in [other.proc.pid, *chaos.descendants(other.proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    other.proc.wait()
    replacement = agent(tmp_path / "shm-new", "replacement.log")
    assert host.finish() == 0, host.text()[-3000:]
    assert replacement.finish() == 0, replacement.text()[-3000:]
    text = host.text() + replacement.text()
    assert re.search(r"resuming from the memory tier: step \d+ \(broadcast from rank \d", text), \
        text[-3000:]
    assert_identical(export(ref, tmp_path / "ref.pt"), export(tmp_path / "ck", tmp_path / "m.pt"))

