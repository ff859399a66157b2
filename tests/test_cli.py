"""The command line: every kind of bad input is one line on stderr and exit code 2, before any
process group exists and before anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as tdist

from distrib.train import main

from .conftest import REPO, free_port, run_cli

BAD_INPUTS = [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lrr", "0.1"], "did you mean --lr?"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--max-epochs", "2.5"], "argument --max-epochs: expected an integer"),
    (["--lr", "-0.1"], "--lr: must be > 0"),
    (["--batch-size", "0"], "--batch-size: must be in [1, 16777216] (got 0)"),
    (["--shard-size-mb", "1e-9"], "--shard-size-mb: must be in [0.001, 1048576]"),
    (["--shard-size-mb", "1e308"], "--shard-size-mb: must be in [0.001, 1048576]"),
    (["--seed", "18446744073709551616"], "--seed: must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    (["--dist-timeout", "1e30"], "--dist-timeout: must be in [1, 604800]"),
    (["--dist-timeout", "1e-9"], "--dist-timeout: must be in [1, 604800]"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--num-workers", str(10**30)], "--num-workers: must be in [0, 256]"),
    (["--lease-timeout", "0.5"], "--lease-timeout: must be 0 (off) or at least 1"),
    (["--task-arg", "dropout=2"], "--task-arg: dropout must be a finite number in [0, 0.999]"),
    (["--task-arg", "hidden=10000000"], "--task-arg: hidden must be a finite number in"),
    (["--task-arg", "hidden=200000"], "--task-arg: these sizes need about"),
    (["--task-arg", "train_samples=1e12"], "--task-arg: train_samples='1e12' is not a valid int"),
    (["--task-arg", "train_samples=1000000000000"], "train_samples must be a finite number"),
    (["--task-arg", "label_noise=nan"], "label_noise must be a finite number"),
    (["--config", "."], "--config: cannot read ."),
    (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
    (["--scheduler", "exp"], "argument --scheduler: invalid choice: 'exp'"),
    (["--precision", "16"], "argument --precision: invalid choice"),
    (["--task", "no.such.module:build"], "--task: cannot import module 'no.such.module'"),
    (["--task", "distrib.tasks.classifier:nope"], "has no function 'nope'"),
    (["--task", "distrib.tasks.classifier"], "--task: must be MODULE:FUNCTION"),
    (["--checkpoint-dir", "bogus://x/y"], "--checkpoint-dir: unsupported URL scheme 'bogus'"),
    (["--loss", "mse"], "--loss: the classifier task supports auto or cross-entropy"),
    (["--monitor-metric", "val_f1"], "--monitor-metric: 'val_f1' is not reported by this task"),
    (["--task-arg", "hiden=3"], "--task-arg: unknown key 'hiden'"),
    (["--task-arg", "hidden=big"], "--task-arg: hidden='big' is not a valid int"),
    (["--config", "missing.toml"], "--config: file not found"),
    (["--checkpoint-dir", "/dev/null"], "--checkpoint-dir: /dev/null is not a directory"),
    (["--checkpoint-dir", "/dev/null/run"], "--checkpoint-dir: /dev/null/run is under /dev/null"),
    (["--log-dir", "/dev/null"], "--log-dir: /dev/null is not a directory"),
    (["--resume", "/nowhere/step-000000001"], "--resume: /nowhere/step-000000001 holds no "
                                                 "committed checkpoint"),
    (["--resume", "/nowhere/step-x"], "--resume: /nowhere/step-x is not a step-N checkpoint"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A two-rank environment whose peer never comes: creating the process group would block,
    # so returning at once proves the check happens before it.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.chdir(tmp_path)
    code = main(argv + ["--checkpoint-dir", str(tmp_path / "ck")] if "--checkpoint-dir" not in argv
                else argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not tdist.is_initialized()
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the checkpoint dir


def test_bad_config_file_via_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("lr = [")
    proc = run_cli([sys.executable, "-m", "distrib.train", "--config", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "is not valid TOML" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_help_lists_every_option(tmp_path: Path) -> None:
    proc = run_cli([sys.executable, "-m", "distrib.train", "--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--task", "--checkpoint-dir", "--max-epochs", "--max-steps", "--batch-size",
                 "--lr", "--optimizer", "--weight-decay", "--momentum", "--scheduler",
                 "--grad-accum-steps", "--clip-grad-norm", "--clip-grad-value", "--precision",
                 "--seed", "--num-workers", "--save-every-steps", "--save-every-epochs",
                 "--eval-every-epochs", "--no-progress", "--config", "--monitor-metric", "--patience",
                 "--no-check-finite", "--restore-best", "--resume", "--force-restart"):
        assert flag in proc.stdout, flag
    assert str(REPO) not in proc.stdout


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """The command's own entry point, in this process (a process each would only add a torch
    import per run)."""
    ck = tmp_path / "ck"
    common = ["--task", "tests.tasks:tiny", "--max-epochs", "1", "--checkpoint-dir", str(ck),
              "--no-progress"]
    assert main(common) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(common + ["--resume", "never"]) == 2
    err = capsys.readouterr().err
    assert "--resume never" in err and "--force-restart" in err
    assert main(common + ["--resume", "never", "--force-restart"]) == 0
    assert "deleted" in capsys.readouterr().err


def test_every_flag_passes_through_torchruns_own_parser() -> None:
    """torchrun parses its whole command line first; a distrib.train flag that is an ambiguous
    abbreviation of a torchrun option (--monitor for --monitor-interval) never reaches distrib."""
    from torch.distributed.run import get_args_parser

    from distrib.config import build_parser

    parser = build_parser()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert "--monitor-metric" in flags and "--monitor" not in flags
    for flag in flags:
        for argv in ([flag, "x"], [f"{flag}=x"]):
            args = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "distrib.train",
                                                 *argv])
            assert args.training_script == "distrib.train" and args.training_script_args == argv
