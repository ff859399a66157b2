"""The examples a user starts from, under real faults, in one launch/chaos.py run: a SIGTERM to
the launcher gives exit 75 and the relaunch loses no steps; then SIGKILLs of ranks (rank 0 first,
then a random one); the final weights must be bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import chaos_with_sigterm

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
    chaos_with_sigterm(tmp_path, ["--seed", "3", "--", *EXAMPLES[name], *COMMON])
