"""``python -m distrib.ckpt``: ls, verify, export, prune, inspect, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore, step_dir
from distrib.ckpt import main

from .ckpt_helpers import training_state


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Four checkpoints with a metric (best at step 20), one incomplete leftover."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "run")), shard_bytes=2048)
    for step, metric in ((10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)):
        state = training_state(step)
        store.save_state(step, state, {"epoch": step // 10, "config": {"lr": 0.1},
                                       "metric": {"name": "val_loss", "value": metric,
                                                  "mode": "min"}})
    store.storage.mkdir(step_dir(50))
    return tmp_path / "run"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_marks_latest_and_best(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "ls", str(run))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["40"].endswith("latest") and rows["20"].endswith("best")
    assert "val_loss=0.2" in rows["20"] and "incomplete" in rows["50"]


def test_verify_exit_code_follows_corruption(run: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, "verify", str(run))[0] == 0
    shard = next((run / step_dir(30)).glob("shard-00001-*"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, _ = _cli(capsys, "verify", str(run))
    assert code == 1 and "step-000000030: INVALID: " in out and "checksum mismatch" in out
    assert _cli(capsys, "verify", str(run), "--step", "20")[0] == 0
    code, out, _ = _cli(capsys, "ls", str(run), "--verify")
    row = next(line for line in out.splitlines() if line.startswith("30"))
    assert " invalid" in row and " valid" not in row


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_with_plain_torch(run: Path, tmp_path: Path, suffix: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"model{suffix}"
    assert _cli(capsys, "export", str(run), str(out), "--best")[0] == 0
    if suffix == ".pt":
        weights = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file
        weights = load_file(str(out))
    expected = training_state(20)["model"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    # a step URL selects that step
    assert _cli(capsys, "export", f"{run}/{step_dir(10)}", str(out))[0] == 0
    assert torch.equal(torch.load(out, weights_only=True)["0.bias"] if suffix == ".pt"
                       else load_file(str(out))["0.bias"], training_state(10)["model"]["0.bias"])


def test_prune_dry_run_then_for_real(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "prune", str(run), "--keep-last", "1", "--keep-best", "1",
                        "--dry-run")
    assert code == 0 and "would delete step-000000010" in out and "would delete step-000000030" in out
    assert len(list(run.iterdir())) == 5
    assert _cli(capsys, "prune", str(run), "--keep-last", "1", "--keep-best", "1")[0] == 0
    # the incomplete step 50 is newer than every valid one: it may be a save in progress
    assert sorted(p.name for p in run.iterdir()) == [step_dir(20), step_dir(40), step_dir(50)]


def test_inspect_shows_manifest_and_config(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "inspect", str(run), "--step", "20")
    assert code == 0 and '"step": 20' in out and "config:" in out and "lr  0.1" in out


@pytest.mark.parametrize("argv, message", [
    (["ls", "{tmp}/nowhere"], "no such directory"),
    (["ls", "{tmp}"], "not a checkpoint directory"),
    (["inspect", "{run}", "--step", "99"], "no checkpoint at step 99"),
    (["export", "{run}", "{tmp}/m.bin"], "must end in .safetensors or .pt"),
    (["ls", "bogus://x"], "unsupported URL scheme"),
])
def test_clear_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      argv: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path / "empty" if a.startswith("{tmp}") and "nowhere" not in a
                     and "m.bin" not in a else tmp_path, run=run) for a in argv]
    (tmp_path / "empty").mkdir(exist_ok=True)
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
