"""The GPU paths: nccl, CUDA tensors in checkpoints (through the pinned snapshot buffer), fp16
with a GradScaler, bf16 autocast, bit-exact resume on the GPU, export of CUDA-trained weights.

Marked ``cuda`` and skipped where there is no GPU (CI has none): on a machine with one, run
``python -m pytest -m cuda``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib.checkpoint.checkpointer import Checkpointer
from distrib.checkpoint.format import Meta
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore

from .ckpt_helpers import assert_same
from .conftest import REPO, base_env, chaos, run_cli

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

JOB = ["--task", "tests.tasks:tiny", "--task-arg", "train=8000", "--task-arg", "dropout=0.1",
       "--max-epochs", "2", "--no-early-stop", "--batch-size", "16", "--save-every-steps", "25",
       "--no-progress", "--log-every-steps", "0"]


def _export(ck: Path, out: Path) -> dict[str, torch.Tensor]:
    proc = run_cli([sys.executable, "-m", "distrib.ckpt", "export", str(ck), str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    weights: dict[str, torch.Tensor] = torch.load(out, weights_only=True)
    assert all(t.device.type == "cpu" for t in weights.values())  # exported for any machine
    return weights


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_resume_on_the_gpu_is_bit_exact(precision: str, tmp_path: Path) -> None:
    """One GPU rank (nccl when torchrun gives it a group), --precision fp16 (GradScaler state
    in every checkpoint) or bf16 autocast, async saves of CUDA tensors; a SIGTERM mid-run, a
    relaunch, and the final weights equal an uninterrupted run's."""
    args = JOB + ["--precision", precision]
    env = base_env()
    ref = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=1", "-m", "distrib.train", *args, "--checkpoint-dir",
                   str(tmp_path / "ref")], cwd=REPO, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "distrib.launch", "--standalone", "--nproc_per_node=1", "-m",
           "distrib.train", *args, "--checkpoint-dir", str(tmp_path / "ck")]
    os.environ.update({k: v for k, v in env.items() if k == "PYTHONPATH"})
    job = chaos.Job(cmd, tmp_path / "log")
    assert job.started.wait(120)
    time.sleep(0.5)
    os.kill(job.proc.pid, signal.SIGTERM)
    assert job.proc.wait(timeout=120) == 75
    again = run_cli(cmd, cwd=REPO, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resumed from .*no steps are lost", again.stderr)
    a, b = _export(tmp_path / "ref", tmp_path / "a.pt"), _export(tmp_path / "ck", tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if precision == "fp16":
        state = CheckpointStore(LocalStorage(str(tmp_path / "ck"))).latest()
        assert state is not None
        scaler = CheckpointStore(LocalStorage(str(tmp_path / "ck"))).load_state(state, "scaler")
        assert scaler is not None and scaler["scale"] > 0


def test_async_save_of_cuda_tensors_goes_through_a_pinned_buffer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 256, device="cuda")).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    ckpt = Checkpointer(CheckpointStore(LocalStorage(str(tmp_path))), rank=0, async_save=True)
    ckpt.save(1, state, {}, Meta(), deferrable=list(model.parameters()))
    ckpt.fence()
    assert ckpt._buffer.data.is_pinned()
    assert ckpt.wait() is False
    loaded = ckpt.store.load_state(ckpt.store.latest())  # type: ignore[arg-type]
    assert_same({k: v.cpu() for k, v in state["model"].items()}, loaded["model"])


def test_nccl_group_of_one_rank(tmp_path: Path) -> None:
    """An nccl process group on one GPU: created, used by the trainer's collectives' helpers,
    and torn down."""
    proc = run_cli([sys.executable, "-c", (
        "import os, torch, torch.distributed as d\n"
        "os.environ.update(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', "
        "MASTER_PORT=str(29000 + os.getpid() % 1000))\n"
        "d.init_process_group('nccl', rank=0, world_size=1)\n"
        "from distrib import Config, Trainer\n"
        f"cfg = Config.from_args({JOB!r} + ['--checkpoint-dir', {str(tmp_path)!r}])\n"
        "r = Trainer(cfg).fit()\n"
        "t = torch.ones(1, device='cuda'); d.all_reduce(t)\n"
        "assert d.get_backend() == 'nccl' and t.item() == 1 and r.global_step > 0\n"
        "d.destroy_process_group(); print('ok')\n")], cwd=REPO, env=base_env())
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
