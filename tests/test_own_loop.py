"""A training loop of one's own made fault tolerant with CheckpointManager (examples/own_loop.py,
and small loops in process): SIGKILLs of random ranks (rank 0 first) end bit-identical to an
uninterrupted run, in the same chaos run as a SIGTERM to the launcher (exit 75, no lost steps); a
relaunch after completion exits 0 at once; the manager's asynchronous saves never mix two steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distrib import CheckpointManager
from distrib.checkpoint.store import CheckpointError

from .conftest import LoggedJob, chaos_with_sigterm

SCRIPT = "examples/own_loop.py"
ARGS = ["--max-steps", "80", "--save-every", "10"]




@pytest.mark.slow
def test_own_loop_survives_sigkills_a_sigterm_and_a_relaunch(tmp_path: Path) -> None:
    chaos_with_sigterm(tmp_path, ["--seed", "5", "--script", SCRIPT, "--", *ARGS])
    assert "it was written at a preemption notice, so no steps are lost" in \
        (tmp_path / "work" / "chaos.log").read_text()
    cmd = [sys.executable, "-m", "distrib.launch", "--standalone", "--nproc_per_node=2", SCRIPT,
           *ARGS, "--checkpoint-dir", str(tmp_path / "work" / "chaos")]
    done = LoggedJob(cmd, tmp_path / "done.log")  # complete: nothing to do, exit 0
    assert done.finish(120) == 0, done.text()[-3000:]
    assert "run already complete" in done.text() and "first optimizer step" not in done.text()


def _loop(directory: Path, steps: int, stop_at: int | None = None, **kw: object
          ) -> tuple[nn.Module, CheckpointManager]:
    """A plain loop on one rank: a small MLP, AdamW, a scheduler, batches from the global RNG."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)
    torch.manual_seed(1)
    manager = CheckpointManager(str(directory), {"model": model, "optimizer": optimizer,
                                                 "scheduler": scheduler},
                                handle_signals=False, **kw)  # type: ignore[arg-type]
    start = manager.resume()
    for step in range(start.step, steps):
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        manager.step_done(step + 1)
        if stop_at == step + 1:
            return model, manager  # a crash: no finish()
    manager.finish(steps)
    return model, manager


def test_an_interrupted_loop_resumes_bit_identical(tmp_path: Path) -> None:
    ref, m = _loop(tmp_path / "ref", 30, save_every_steps=7)
    m.close()
    _, m = _loop(tmp_path / "ck", 30, stop_at=17, save_every_steps=7)
    m.close("failed")
    again, m = _loop(tmp_path / "ck", 30, save_every_steps=7)
    m.close()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                 again.state_dict().values()))
    done, m = _loop(tmp_path / "ck", 30, save_every_steps=7)  # complete: loads the final state
    m.close()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                 done.state_dict().values()))


def test_async_saves_hold_one_step(tmp_path: Path) -> None:
    """Every asynchronous save, taken right before optimizer.step() changes the weights, holds
    exactly the weights of its own step (the optimizer's step pre-hook waits for the copy)."""
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(CheckpointManager):
        def save(self, step: int, **kw: object) -> None:  # type: ignore[override]
            seen[step] = {k: v.clone() for k, v in self.objects["model"].state_dict().items()}
            super().save(step, **kw)  # type: ignore[arg-type]

    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = Snap(str(tmp_path), {"model": model, "optimizer": optimizer},
                   save_every_steps=1, keep_last=100, handle_signals=False)
    manager.resume()
    for step in range(6):
        model(torch.randn(4, 512)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.step_done(step + 1)
    manager.finish(6)
    manager.close()
    from distrib.checkpoint.storage import open_storage
    from distrib.checkpoint.store import CheckpointStore

    store = CheckpointStore(open_storage(str(tmp_path)))
    for info in store.scan():
        model_state = store.read(info, subtree="model").state()
        assert all(torch.equal(model_state[k], seen[info.step][k]) for k in model_state)


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    _, m = _loop(tmp_path, 5, save_every_steps=5)
    m.close()
    other = nn.Linear(3, 3)
    manager = CheckpointManager(str(tmp_path), {"model": other}, handle_signals=False)
    with pytest.raises(CheckpointError):
        manager.resume()
    manager.close("failed")
