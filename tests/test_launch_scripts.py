"""launch/local.sh, launch/multinode.sh and launch/slurm.sbatch: the commands they build from each
scheduler's variables, clear failures for missing ones, and real runs (a signal included)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib import exitcodes

from .conftest import REPO, base_env, free_port

LAUNCH = REPO / "launch"
TINY = ["--task", "tests.tasks:tiny", "--max-epochs", "1", "--no-early-stop", "--batch-size", "16",
        "--log-every-steps", "0"]
SCHEDULER_VARS = ("PET_", "SLURM_", "JOB_COMPLETION_INDEX", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
                  "RDZV_", "MAX_RESTARTS", "DRY_RUN", "CHECKPOINT_DIR")


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in base_env().items() if not k.startswith(SCHEDULER_VARS)}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LAUNCH / name), *args], env=script_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def printed_command(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("+ "))
    return line[2:].split()


def test_local_dry_run_prints_the_standalone_command() -> None:
    argv = printed_command(run_script("local.sh", "--max-epochs", "3", DRY_RUN="1",
                                      NPROC_PER_NODE="4"))
    assert argv == [sys.executable, "-m", "distrib.launch", "--standalone", "--nproc_per_node=4",
                    "--max-restarts=0", "-m", "distrib.train", "--max-epochs", "3"]


@pytest.mark.parametrize("env, expected", [
    ({"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "RDZV_HOST": "job-0.svc", "JOB_NAME": "job"},
     ["--nnodes=2", "--node_rank=1", "--rdzv-endpoint=job-0.svc:29500", "--rdzv-id=job"]),
    ({"SLURM_JOB_ID": "77", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
      "SLURM_JOB_NODELIST": "gpu[003-004,010],login1"},
     ["--nnodes=3", "--node_rank=2", "--rdzv-endpoint=gpu003:29500", "--rdzv-id=77"]),
    ({"SLURM_JOB_ID": "78", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
      "SLURM_JOB_NODELIST": "nodeA,nodeB", "RDZV_PORT": "6000"},
     ["--nnodes=2", "--node_rank=0", "--rdzv-endpoint=nodeA:6000", "--rdzv-id=78"]),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "7000",
      "RDZV_ID": "exp1", "MAX_RESTARTS": "5"},
     ["--nnodes=2", "--node_rank=0", "--rdzv-endpoint=10.0.0.5:7000", "--rdzv-id=exp1",
      "--max-restarts=5"]),
], ids=["indexed-job", "slurm-range", "slurm-list", "generic"])
def test_multinode_builds_the_rendezvous_from_each_schedulers_variables(
        env: dict[str, str], expected: list[str]) -> None:
    argv = printed_command(run_script("multinode.sh", "--seed", "3", DRY_RUN="1",
                                      NPROC_PER_NODE="8", **env))
    assert argv[:3] == [sys.executable, "-m", "distrib.launch"]
    assert set(expected) <= set(argv) and "--rdzv-backend=c10d" in argv
    assert "--nproc_per_node=8" in argv
    assert argv[-4:] == ["-m", "distrib.train", "--seed", "3"]


def test_multinode_under_kubeflow_leaves_the_options_to_torchruns_pet_variables() -> None:
    argv = printed_command(run_script("multinode.sh", DRY_RUN="1", PET_NNODES="1:4",
                                      PET_RDZV_ENDPOINT="job-worker-0:29400"))
    assert argv == [sys.executable, "-m", "distrib.launch", "-m", "distrib.train"]


@pytest.mark.parametrize("script, env, message", [
    ("multinode.sh", {}, "NNODES is not set (no scheduler variables found"),
    ("multinode.sh", {"JOB_COMPLETION_INDEX": "0", "NNODES": "2"},
     "RDZV_HOST is not set (Kubernetes Indexed Job"),
    ("multinode.sh", {"SLURM_JOB_ID": "5", "SLURM_NNODES": "2"}, "SLURM_NODEID is not set (SLURM"),
    ("multinode.sh", {"PET_NNODES": "2"}, "PET_RDZV_ENDPOINT or PET_MASTER_ADDR is not set"),
    ("multinode.sh", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "x"},
     "the node rank must be a whole number below NNODES=2 (got '2')"),
    ("multinode.sh", {"NNODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "x"},
     "NNODES must be a positive integer (got 'two')"),
    ("local.sh", {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer"),
    ("local.sh", {"PYTHON": "/bin/false"}, "cannot import torch"),
    ("slurm.sbatch", {}, "not inside a SLURM job"),
    ("slurm.sbatch", {"SLURM_JOB_ID": "9"}, "CHECKPOINT_DIR is not set"),
])
def test_a_missing_or_bad_variable_fails_with_one_clear_line(script: str, env: dict[str, str],
                                                            message: str) -> None:
    proc = run_script(script, DRY_RUN="1", **env)
    assert proc.returncode == exitcodes.PERMANENT
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"{script}: ")


def test_slurm_batch_script_signals_before_the_limit_and_requeues_on_preemption() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
    assert re.fullmatch(r"USR1@\d+", sbatch["signal"]) and "requeue" in sbatch
    assert int(re.search(r"^PREEMPTED=(\d+)", text, re.M).group(1)) == exitcodes.PREEMPTED  # type: ignore[union-attr]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "launch/multinode.sh" in text


@pytest.mark.slow
def test_local_sh_trains_to_completion(tmp_path: Path) -> None:
    proc = run_script("local.sh", *TINY, "--checkpoint-dir", str(tmp_path / "ck"),
                      NPROC_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "+ " + sys.executable + " -m distrib.launch --standalone" in proc.stderr
    assert "training finished after 1 epochs" in proc.stderr


@pytest.mark.slow
def test_multinode_under_slurm_checkpoints_and_exits_75_on_sigusr1(tmp_path: Path) -> None:
    """What ``#SBATCH --signal=USR1@180`` does near the time limit: SLURM signals the task
    (multinode.sh, which execs distrib.launch); the job writes an emergency checkpoint and exits
    with the "preempted" code that slurm.sbatch requeues on. A second run resumes and finishes."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "127.0.0.1", "RDZV_PORT": str(free_port()),
           "NPROC_PER_NODE": "2", "MAX_RESTARTS": "0"}
    args = ["bash", str(LAUNCH / "multinode.sh"), *TINY, "--task-arg", "train=40000",
            "--checkpoint-dir", str(tmp_path / "ck")]
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=script_env(**env), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "first optimizer step done" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == exitcodes.PREEMPTED, log.read_text()[-3000:]
    assert "emergency checkpoint committed" in log.read_text()
    again = subprocess.run(args, env=script_env(**env), cwd=REPO, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no steps are lost" in again.stderr or "0 steps are replayed" in again.stderr, (
        again.stderr[-3000:])


def test_setup_refuses_an_unknown_installer_before_it_creates_anything(tmp_path: Path) -> None:
    """``INSTALLER`` is checked first: a typo exits 2 with one line, and no environment is
    created (setup.sh itself runs in CI, from a fresh clone, with uv)."""
    venv = tmp_path / "venv"
    proc = run_script("setup.sh", "test", INSTALLER="pipx", VENV=str(venv))
    assert proc.returncode == 2
    assert proc.stderr == "setup.sh: INSTALLER must be uv or pip, not 'pipx'\n"
    assert not venv.exists()
