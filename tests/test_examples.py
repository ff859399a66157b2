"""The examples a user starts from, under real faults, in one launch/chaos.py run: a SIGTERM to
the launcher gives exit 75 and the relaunch loses no steps; then SIGKILLs of ranks (rank 0 first,
then a random one); the final weights must be bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import chaos_with_sigterm

pytestmark = pytest.mark.slow

COMMON = ["--save-every-steps", "10", "--no-early-stop", "--log-every-steps", "0",
          "--no-progress"]
# Epochs: enough training left after the SIGTERM for both kills, however fast the machine runs.
# The faults come at times (0.1-0.6 s after a start's first step), and the cnn and streaming
# examples take only 16-24 fast steps an epoch, so their emergency checkpoint (written at the
# flag exchange after the SIGTERM, here the epoch's end) can be the end of epoch 2. With 3
# epochs the one left sometimes ended before the second kill: kills 1, not 2 (2 suite runs in 4).
EXAMPLES = {
    "gpt2_tokens": ["--task", "examples.gpt2_tokens:build", "--num-workers", "2",
                    "--batch-size", "8", "--task-arg", "samples=384", "--max-epochs", "3"],
    "cnn_batchnorm": ["--task", "examples.cnn_batchnorm:build", "--batch-size", "16",
                      "--task-arg", "samples=768", "--max-epochs", "6"],
    "streaming": ["--task", "examples.streaming:build", "--num-workers", "2",
                  "--batch-size", "32", "--max-epochs", "6"],
}






@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_survives_sigkills_and_a_sigterm(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers") if name == "gpt2_tokens" else None
    chaos_with_sigterm(tmp_path, ["--seed", "3", "--", *EXAMPLES[name], *COMMON])
