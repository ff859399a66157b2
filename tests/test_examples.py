"""The examples a user starts from, under real faults: launch/chaos.py SIGKILLs ranks (rank 0
first, then random ones) and the final weights must be bit-identical to an uninterrupted run;
a SIGTERM to the launcher gives exit 75, the relaunch loses no steps and ends bit-identical too."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, base_env, chaos, run_cli

pytestmark = pytest.mark.slow

COMMON = ["--max-epochs", "3", "--save-every-steps", "10", "--no-early-stop",
          "--log-every-steps", "0", "--no-progress"]
EXAMPLES = {
    "gpt2_tokens": ["--task", "examples.gpt2_tokens:build", "--num-workers", "2",
                    "--batch-size", "8", "--task-arg", "samples=384"],
    "cnn_batchnorm": ["--task", "examples.cnn_batchnorm:build", "--batch-size", "16",
                      "--task-arg", "samples=768"],
    "streaming": ["--task", "examples.streaming:build", "--num-workers", "2",
                  "--batch-size", "32"],
}
ENV = base_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


class Job(chaos.Job):  # type: ignore[misc, name-defined]
    def __init__(self, cmd: list[str], log: Path) -> None:
        os.environ.update({k: v for k, v in ENV.items() if k in ("PYTHONPATH", "OMP_NUM_THREADS")})
        os.chdir(REPO)
        super().__init__(cmd, log)
        self.log_path = log

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_survives_sigkills_and_a_sigterm(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers") if name == "gpt2_tokens" else None
    args = EXAMPLES[name] + COMMON
    work = tmp_path / "work"
    result_file = tmp_path / "chaos.json"
    proc = run_cli([sys.executable, str(REPO / "launch" / "chaos.py"), "--kills", "2",
                    "--seed", "3", "--min-delay", "0.1", "--max-delay", "0.6",
                    "--workdir", str(work), "--json", str(result_file),
                    "--", *args], cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(result_file.read_text())
    assert result["identical"] is True and result["kills"] == 2
    assert "SIGKILL rank 0" in proc.stdout

    ckpt = tmp_path / "sigterm"
    cmd = [sys.executable, "-m", "distrib.launch", "--standalone", "--nproc_per_node=2", "-m",
           "distrib.train", *args, "--checkpoint-dir", str(ckpt)]
    job = Job(cmd, tmp_path / "sigterm.log")
    assert job.started.wait(120), job.text()[-3000:]
    time.sleep(0.3)
    os.kill(job.proc.pid, signal.SIGTERM)
    assert job.proc.wait(timeout=120) == 75, job.text()[-3000:]
    step = int(re.search(r"emergency checkpoint at step (\d+)", job.text()).group(1))  # type: ignore[union-attr]
    again = Job(cmd, tmp_path / "relaunch.log")
    assert again.proc.wait(timeout=300) == 0, again.text()[-3000:]
    time.sleep(0.2)
    assert f"step {step}" in again.text() and "no steps are lost" in again.text()
    chaos.export(ckpt, tmp_path / "sigterm.pt")
    assert chaos.compare(work / "reference.pt", tmp_path / "sigterm.pt") == []
