"""Configuration: defaults < TOML file < command line, validation, fingerprint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distrib.config import (
    OPTION_INDEX,
    CheckpointConfig,
    Config,
    ConfigError,
    build_parser,
    flag_name,
    parse_args,
)


def test_defaults_are_valid_and_documented() -> None:
    config = Config()
    assert config.ckpt.checkpoint_dir == "./checkpoints"
    assert config.train.task == "distrib.tasks.classifier:build"
    help_text = build_parser().format_help()
    for name in OPTION_INDEX:
        assert flag_name(name) in help_text, name
    # every option shows its default
    assert help_text.count("(default:") == len(OPTION_INDEX)


def test_toml_file_then_command_line_override(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.05\nmax-epochs = 7\ntask-arg = { hidden = "8" }\n'
                    '[optim]\noptimizer = "sgd"\nmomentum = 0.5\n'
                    '[ckpt]\nkeep_last = 5\nstorage-option = { anon = "true" }\n')
    config = parse_args(["--config", str(path), "--lr", "0.2"])
    assert config.optim.lr == 0.2  # the flag wins over the file
    assert config.optim.optimizer == "sgd" and config.optim.momentum == 0.5
    assert config.train.max_epochs == 7
    assert config.ckpt.keep_last == 5
    assert config.ckpt.storage_options == {"anon": "true"}
    assert config.train.task_args == {"hidden": "8"}


def test_step_intervals_are_numbers_or_auto_in_a_file_on_the_command_line_and_in_python(
        tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('save-every-steps = 200\nmemory-every-steps = 20\n')
    config = parse_args(["--config", str(path)])
    assert config.ckpt.save_steps() == 200 and config.ckpt.memory_steps() == 20
    path.write_text('save-every-steps = "auto"\nmemory-every-steps = "auto"\n')
    config = parse_args(["--config", str(path)])
    assert config.ckpt.save_steps() == "auto" and config.ckpt.memory_steps() == 0
    config = parse_args(["--save-every-steps", "0", "--memory-every-steps", "off"])
    assert config.ckpt.save_steps() == 0 and config.ckpt.memory_steps() is None
    assert CheckpointConfig(save_every_steps=50).save_steps() == 50  # type: ignore[arg-type]


@pytest.mark.parametrize("content, message", [
    ("lr = ", "not valid TOML"),
    ("save-every-steps = -5", "--save-every-steps: must be a number of steps >= 0 or auto"),
    ("save-every-steps = 2.5", "save-every-steps: expected a number of steps or a word"),
    ("max_epoch = 3", "unknown option 'max_epoch' (did you mean --max-epochs?)"),
    ('lr = "fast"', "lr: expected a number"),
    ("[optim]\nmax_epochs = 3", "unknown option 'max_epochs' in [optim]"),
    ("batch-size = 0", "--batch-size: must be in [1, 16777216] (got 0)"),
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_bad_toml_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("changes, flag", [
    ({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"), ({"momentum": 1.5}, "--momentum"),
    ({"gamma": 0.0}, "--gamma"), ({"keep_last": 0}, "--keep-last"),
    ({"task": "no_colon"}, "--task"), ({"min_delta": -0.1}, "--min-delta"),
    ({"clip_grad_norm": float("nan")}, "--clip-grad-norm"),
])
def test_out_of_range_values_name_the_flag(changes: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        Config().replace(**changes)


def test_round_trip_and_fingerprint() -> None:
    config = parse_args(["--lr", "0.01", "--betas", "0.8,0.9", "--checkpoint-dir", "/a"])
    again = Config.from_dict(config.to_dict())
    assert again == config
    # paths and logging do not change the trajectory; the learning rate does
    assert config.replace(checkpoint_dir="/b", log_level="debug").fingerprint() == \
        config.fingerprint()
    assert config.replace(lr=0.02).fingerprint() != config.fingerprint()


def test_nested_python_construction() -> None:
    from distrib import OptimConfig, TrainConfig

    config = Config(train=TrainConfig(max_epochs=2), optim=OptimConfig(lr=0.3))
    assert config.to_dict()["max_epochs"] == 2 and config.optim.lr == 0.3
    with pytest.raises(ConfigError, match="--optimizer: invalid choice 'lion'"):
        OptimConfig(optimizer="lion")
