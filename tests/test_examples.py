"""The examples a user starts from, under real faults: launch/chaos.py SIGKILLs ranks (rank 0
first, then random ones) and the final weights must be bit-identical to an uninterrupted run;
a SIGTERM to the launcher gives exit 75, the relaunch loses no steps and ends bit-identical too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import chaos_then_sigterm

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






@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_survives_sigkills_and_a_sigterm(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers") if name == "gpt2_tokens" else None
    args = EXAMPLES[name] + COMMON
    cmd = [sys.executable, "-m", "distrib.launch", "--standalone", "--nproc_per_node=2", "-m",
           "distrib.train", *args, "--checkpoint-dir", str(tmp_path / "sigterm")]
    chaos_then_sigterm(tmp_path, ["--seed", "3", "--", *args], cmd)
