"""Frozen, validated run configuration, built from defaults < TOML file < command line.

Every option lives in exactly one section dataclass; its command-line flag is the field name in
kebab-case (``max_epochs`` -> ``--max-epochs``) and the same name (kebab or snake case) is accepted
in a TOML file given with ``--config``, either at the top level or inside a table named after its
section (``[optim]``). The command-line parser and the TOML reader are generated from the dataclass
fields, so an option is declared once.

Contract: constructing any section validates it in ``__post_init__`` and raises
:class:`ConfigError` with a one-line message that names the flag and what is allowed. This module
imports nothing from torch or the rest of ``distrib``, so a bad configuration is rejected before
any process group exists and before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, NoReturn, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line meant for the user."""


Resume = Literal["fixed", "logged", "ignored"]


def _opt(default: Any, help: str, *, choices: Sequence[str] | None = None,
         metavar: str | None = None, fingerprint: bool = True, flag: str | None = None,
         lo: float | None = None, hi: float | None = None, gt: float | None = None,
         resume: Resume = "logged", steps: bool = False) -> Any:
    """Declare an option: its default, help text, allowed choices and range.

    ``fingerprint=False`` marks options that do not change the training trajectory (paths,
    logging, retention); they are left out of :meth:`Config.fingerprint`. Numbers must lie in
    ``[lo, hi]`` (and be ``> gt``); every number must be finite. ``resume`` says what a
    different value on resume means (:func:`resume_differences`): ``fixed`` options shape the
    model, the data, the optimizer or the seed (an error unless ``--allow-config-change``),
    ``logged`` ones may change between launches, ``ignored`` ones belong to one launch.
    ``steps``: a string option that holds a number of steps or a word (``auto``); an int given
    in Python becomes its string.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "fingerprint": fingerprint, "flag": flag, "lo": lo, "hi": hi,
            "gt": gt, "resume": resume, "steps": steps}
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(type(default), default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line flag for a field name: ``max_epochs`` -> ``--max-epochs``."""
    return _FLAG_OVERRIDES.get(name, "--" + name.replace("_", "-"))


_FLAG_OVERRIDES = {"task_args": "--task-arg", "storage_options": "--storage-option",
                   # not --monitor: torchrun would take it for an abbreviation of its own
                   # --monitor-interval (and refuse it as ambiguous) before distrib saw it
                   "monitor": "--monitor-metric"}


def _fail(name: str, message: str) -> NoReturn:
    raise ConfigError(f"{flag_name(name)}: {message}")


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(name, f"invalid choice {value!r} (choose from {', '.join(choices)})")


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_fields(section: Any) -> None:
    """Type, choice and range checks declared with :func:`_opt`, for every field of a section
    (so a section built in Python is checked as strictly as a command line). Ints given for
    float options become floats; tuples and dicts are normalised."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        base, optional = _field_type(f)
        if value is None and optional:
            continue
        if f.metadata["steps"] and type(value) is int:
            value = str(value)
        value = _check_type(f.name, base, value)
        object.__setattr__(section, f.name, value)
        meta = f.metadata
        if meta["choices"]:
            _choice(f.name, value, meta["choices"])
        if base in (int, float):
            _check_range(f.name, value, meta["lo"], meta["hi"], meta["gt"])


def _check_type(name: str, base: Any, value: Any) -> Any:
    origin = typing.get_origin(base)
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = type(value) is int
    elif base is float:
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str) and "\0" not in value
    elif origin is tuple:
        ok = isinstance(value, (tuple, list)) and all(
            type(v) in (int, float) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:  # dict[str, str]
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        value = {k: str(v) for k, v in value.items()} if ok else value
    if not ok:
        _fail(name, f"expected {_type_word(base, False)}, got {value!r}")
    return value


def _check_range(name: str, value: float, lo: float | None, hi: float | None,
                 gt: float | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        _fail(name, f"must be a finite number (got {value})")
    if gt is not None and value <= gt:
        _fail(name, f"must be > {_fmt(gt)} (got {_fmt(value)})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            _fail(name, f"must be >= {_fmt(lo)} (got {_fmt(value)})")  # type: ignore[arg-type]
        low = "" if lo is None else _fmt(lo)
        _fail(name, f"must be in [{low}, {_fmt(hi)}] (got {_fmt(value)})")


_BIG = 10**15  # steps, epochs: beyond any real run, small enough for JSON and float64


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "cosine", "plateau", "warmup-cosine")
PRECISIONS = ("32", "bf16", "fp16")
LOSSES = ("auto", "cross-entropy", "mse", "l1", "smooth-l1")
LOG_LEVELS = ("debug", "info", "warning", "error")
MODES = ("min", "max")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """What to train and how the loop runs."""

    task: str = _opt("distrib.tasks.classifier:build",
                     "the task to train, as MODULE:FUNCTION; the function receives the Config and "
                     "returns a distrib.Task", metavar="MODULE:FUNCTION", resume="fixed")
    task_args: dict[str, str] = _opt({}, "a task-specific option KEY=VALUE (repeatable); the task "
                                     "reads them from config.train.task_args", metavar="KEY=VALUE",
                                     flag="--task-arg", resume="fixed")
    loss: str = _opt("auto", "loss function, for tasks that offer several ('auto': the task's "
                     "default; sequence task: mse, l1, smooth-l1)", choices=LOSSES,
                     resume="fixed")
    seed: int = _opt(0, "seed for data, model init, sampler order and every RNG", lo=0,
                     hi=2**32 - 1, resume="fixed")
    max_epochs: int = _opt(20, "stop after this many epochs", lo=1, hi=_BIG)
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: no limit)", lo=0, hi=_BIG)
    batch_size: int = _opt(64, "samples per rank per micro-step (the global batch is "
                           "batch-size x world size x grad-accum-steps)", lo=1, hi=2**24,
                           resume="fixed")
    grad_accum_steps: int = _opt(1, "micro-steps per optimizer step; gradients are synchronised "
                                 "across ranks only on the last one", lo=1, hi=10**6,
                                 resume="fixed")
    eval_every_epochs: int = _opt(1, "run validation every N epochs (and after the last one)",
                                  lo=1, hi=_BIG)
    num_workers: int = _opt(0, "data-loader worker processes per rank", fingerprint=False,
                            lo=0, hi=256)
    precision: str = _opt("32", "32-bit, bfloat16 autocast, or float16 autocast with a GradScaler",
                          choices=PRECISIONS, resume="fixed")
    clip_grad_norm: float | None = _opt(None, "clip the global gradient norm to this value",
                                        gt=0, resume="fixed")
    clip_grad_value: float | None = _opt(None, "clip every gradient element to [-v, v]", gt=0,
                                         resume="fixed")
    dist_timeout: float = _opt(300.0, "seconds a collective may wait for a peer before the job "
                               "fails (a rank that died does not hang the others forever)",
                               fingerprint=False, lo=1, hi=7 * 86400)

    def __post_init__(self) -> None:
        _check_fields(self)
        module, _, func = self.task.partition(":")
        if not module.strip() or not func.strip():
            _fail("task", f"must be MODULE:FUNCTION (got {self.task!r})")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """The optimizer (ignored when the task brings its own optimizer factory)."""

    optimizer: str = _opt("adamw", "optimizer", choices=OPTIMIZERS, resume="fixed")
    lr: float = _opt(1e-3, "peak learning rate", gt=0, resume="fixed")
    weight_decay: float = _opt(0.0, "weight decay (decoupled for adamw)", lo=0, resume="fixed")
    momentum: float = _opt(0.9, "momentum for sgd and rmsprop", lo=0, resume="fixed")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam/AdamW betas as B1,B2", metavar="B1,B2",
                                      resume="fixed")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.momentum >= 1.0:
            _fail("momentum", f"must be in [0, 1) (got {self.momentum})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("betas", f"must be two numbers in [0, 1) (got {self.betas})")


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedConfig:
    """The learning-rate schedule (ignored when the task brings its own scheduler factory)."""

    scheduler: str = _opt("none", "'step': multiply by gamma every step-size epochs; 'cosine': "
                          "cosine decay to min-lr over the run's optimizer steps; 'plateau': "
                          "multiply by plateau-factor when the monitored metric stalls; "
                          "'warmup-cosine': linear warm-up then cosine", choices=SCHEDULERS,
                          resume="fixed")
    step_size: int = _opt(5, "epochs between decays (step)", lo=1, hi=_BIG, resume="fixed")
    gamma: float = _opt(0.1, "decay factor (step)", gt=0, hi=1, resume="fixed")
    min_lr: float = _opt(0.0, "final learning rate (cosine, warmup-cosine)", lo=0,
                         resume="fixed")
    warmup_steps: int = _opt(100, "optimizer steps of linear warm-up (warmup-cosine)", lo=0,
                             hi=_BIG, resume="fixed")
    plateau_factor: float = _opt(0.1, "decay factor (plateau)", gt=0, hi=1, resume="fixed")
    plateau_patience: int = _opt(2, "evaluations without improvement before a decay (plateau)",
                                 lo=0, hi=_BIG, resume="fixed")

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Where and when checkpoints are written."""

    checkpoint_dir: str = _opt("./checkpoints", "checkpoint location: a local path or an fsspec "
                               "URL (file://, s3://bucket/prefix, memory://)", metavar="URL",
                               fingerprint=False)
    save_every_steps: str = _opt("0", "checkpoint every N optimizer steps (0: off), or 'auto': "
                                 "the interval that minimises lost work plus checkpoint "
                                 "overhead (Young/Daly, from the measured save cost and the "
                                 "time between failures, see --mtbf-hours)", metavar="N|auto",
                                 fingerprint=False, steps=True)
    save_every_epochs: int = _opt(1, "checkpoint at the end of every N epochs (0: off; the last "
                                  "epoch is always saved)", fingerprint=False, lo=0, hi=_BIG)
    keep_last: int = _opt(3, "keep the newest K checkpoints", fingerprint=False, lo=1, hi=10**6)
    keep_best: int = _opt(0, "also keep the K best checkpoints by --monitor-metric",
                          fingerprint=False, lo=0, hi=10**6)
    async_save: bool = _opt(True, "write checkpoints in a background thread after a quick "
                            "in-memory snapshot", fingerprint=False)
    shard_size_mb: float = _opt(256.0, "largest checkpoint shard file, in MB", fingerprint=False,
                                lo=0.001, hi=2**20)
    max_failed_saves: int = _opt(3, "end the job after this many consecutive failed saves "
                                 "(a save that commits resets the count)", fingerprint=False,
                                 lo=1, hi=10**6)
    resume: str = _opt("auto", "'auto': continue from the newest valid checkpoint in "
                       "--checkpoint-dir if there is one; 'never': start fresh (refuses a "
                       "directory holding checkpoints unless --force-restart); or the URL of one "
                       "step-N checkpoint directory to start from when --checkpoint-dir holds "
                       "none yet", metavar="auto|never|URL", fingerprint=False, resume="ignored")
    force_restart: bool = _opt(False, "delete the checkpoints in --checkpoint-dir and start over "
                               "(also after a finished run)", fingerprint=False,
                               resume="ignored")
    allow_config_change: bool = _opt(False, "resume even though options that shape the model, "
                                     "the data, the optimizer or the seed differ from the "
                                     "checkpoint's (the differences are logged)",
                                     fingerprint=False, resume="ignored")
    lease_timeout: float = _opt(60.0, "seconds without a heartbeat after which another run's "
                                "lease on --checkpoint-dir counts as stale (0: no lease)",
                                fingerprint=False, lo=0, hi=86400)
    memory_every_steps: str = _opt("off", "memory tier: snapshot the training state into "
                                   "node-local shared memory every N optimizer steps, or 'auto' "
                                   "(Young/Daly from the measured snapshot cost and "
                                   "--mtbf-hours), or 'off'; a restarted worker resumes from it "
                                   "without reading --checkpoint-dir", metavar="N|auto|off",
                                   fingerprint=False, steps=True)
    memory_dir: str = _opt("/dev/shm", "the node-local tmpfs directory of the memory tier",
                           metavar="DIR", fingerprint=False, resume="ignored")
    mtbf_hours: float = _opt(4.0, "expected hours between failures, for the 'auto' intervals "
                             "(combined with the failures this run's records show)",
                             fingerprint=False, gt=0, hi=10**6)
    storage_options: dict[str, str] = _opt({}, "an fsspec storage option KEY=VALUE (repeatable; "
                                           "values are parsed as JSON when they can be)",
                                           metavar="KEY=VALUE", fingerprint=False,
                                           flag="--storage-option")

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.checkpoint_dir.strip():
            _fail("checkpoint_dir", "must not be empty")
        if not self.resume.strip():
            _fail("resume", "must be auto, never or a checkpoint URL")
        if 0 < self.lease_timeout < 1:
            _fail("lease_timeout", f"must be 0 (off) or at least 1 (got {self.lease_timeout:g})")
        if self.memory_steps() == -1:
            _fail("memory_every_steps", f"must be a number of steps >= 1, auto or off (got "
                  f"{self.memory_every_steps!r})")
        if self.save_steps() == -1:
            _fail("save_every_steps", f"must be a number of steps >= 0 or auto (got "
                  f"{self.save_every_steps!r})")
        if not self.memory_dir.strip() or "\0" in self.memory_dir:
            _fail("memory_dir", "must name a directory")

    def memory_steps(self) -> int | None:
        """--memory-every-steps as the checkpoint manager takes it: None (off), 0 (auto) or N
        (-1: not valid)."""
        steps = _steps(self.memory_every_steps)
        return None if steps == 0 else 0 if steps == "auto" else steps

    def save_steps(self) -> int | Literal["auto"]:
        """--save-every-steps as the checkpoint manager takes it: N (0: off) or "auto" (-1: not
        valid)."""
        return _steps(self.save_every_steps)


def _steps(text: str) -> int | Literal["auto"]:
    """A number of steps (0: off, also spelled off or none), "auto", or -1 (not valid)."""
    text = text.strip().lower()
    if text in ("off", "none"):
        return 0
    if text == "auto":
        return "auto"
    digits = text.isascii() and text.isdecimal() and len(text) <= len(str(_BIG))
    return int(text) if digits and int(text) <= _BIG else -1


@dataclass(frozen=True, kw_only=True, slots=True)
class EarlyStopConfig:
    """The monitored metric (early stopping, the plateau schedule, the best checkpoint)."""

    monitor: str = _opt("val_loss", "the metric that decides 'better': val_loss, train_loss or "
                        "val_<name> for a metric the task reports", resume="fixed")
    mode: str = _opt("min", "whether lower (min) or higher (max) values of --monitor-metric "
                     "are better", choices=MODES, resume="fixed")
    early_stop: bool = _opt(True, "stop when --monitor-metric stops improving")
    patience: int = _opt(3, "evaluations without improvement before stopping", lo=0, hi=_BIG)
    min_delta: float = _opt(0.0, "an improvement must beat the best by more than this", lo=0)
    stopping_threshold: float | None = _opt(None, "stop once --monitor-metric is better than "
                                            "this")
    divergence_threshold: float | None = _opt(None, "stop once --monitor-metric is worse than "
                                              "this")
    check_finite: bool = _opt(True, "stop when --monitor-metric is NaN or infinite")
    baseline: float | None = _opt(None, "improvements count only once they beat this value")
    start_from_epoch: int = _opt(0, "ignore the evaluations of the first N epochs", lo=0,
                                 hi=_BIG)
    restore_best: bool = _opt(False, "end with the weights of the best evaluation")

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.monitor.strip():
            _fail("monitor", "must name a metric")


@dataclass(frozen=True, kw_only=True, slots=True)
class LogConfig:
    """Progress and logging."""

    progress: bool = _opt(True, "a progress bar on rank 0 (only when stdout is a terminal)",
                          fingerprint=False, resume="ignored")
    log_level: str = _opt("info", "log level of rank 0 (other ranks log warnings and errors only)",
                          choices=LOG_LEVELS, fingerprint=False)
    log_every_steps: int = _opt(50, "log and record the running train loss every N optimizer "
                                "steps (0: off)", fingerprint=False, lo=0, hi=_BIG)
    log_dir: str = _opt("", "where rank 0 writes the run records (JSON lines): a local path or an "
                        "fsspec URL; empty: <checkpoint-dir>/logs", metavar="URL",
                        fingerprint=False)
    tensorboard: bool = _opt(False, "also write the records as TensorBoard event files in "
                             "<log-dir>/tensorboard (needs the tensorboard extra)",
                             fingerprint=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.log_dir != self.log_dir.strip():
            _fail("log_dir", f"must not start or end with spaces (got {self.log_dir!r})")


SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "ckpt": CheckpointConfig,
    "early_stop": EarlyStopConfig,
    "log": LogConfig,
}
SECTION_TITLES = {
    "train": "task and training loop",
    "optim": "optimizer",
    "sched": "learning-rate schedule",
    "ckpt": "checkpoints",
    "early_stop": "early stopping and the monitored metric",
    "log": "progress and logging",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """The whole run configuration: one frozen dataclass per concern.

    Build it in Python with the sections (``Config(optim=OptimConfig(lr=0.1))``), from a flat
    mapping of option names (:meth:`from_dict`), or from command-line arguments (:meth:`from_args`).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "Config":
        """Build from option names (snake or kebab case, flat or nested by section).

        Raises :class:`ConfigError` for an unknown name, a value of the wrong type, or an invalid
        value.
        """
        flat = _flatten(values, source)
        return _build({name: _coerce(OPTION_INDEX[name][1], v, source) for name, v in flat.items()})

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> "Config":
        """Parse command-line arguments (with an optional ``--config FILE``); see :func:`parse_args`."""
        return parse_args(argv)

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-able mapping of every option name to its value."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with storage-option values masked: safe to log and to save in a
        checkpoint manifest (options may carry credentials)."""
        out = self.to_dict()
        out["storage_options"] = {key: "***" for key in out["storage_options"]}
        return out

    def replace(self, **changes: Any) -> "Config":
        """A copy with some options changed, by flat option name (validated again)."""
        merged = self.to_dict()
        changes = {_canonical(k): v for k, v in changes.items()}
        for name in changes:
            if name not in OPTION_INDEX:
                raise ConfigError(f"unknown option {name!r}{_suggest(name)}")
        merged.update(changes)
        return Config.from_dict(merged)

    def fingerprint(self) -> str:
        """A short hash of the options that shape the training trajectory.

        Two runs with equal fingerprints follow the same trajectory from the same checkpoint;
        paths, logging, retention and worker counts are excluded.
        """
        relevant = {name: value for name, value in self.to_dict().items()
                    if OPTION_INDEX[name][1].metadata["fingerprint"]}
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resume_differences(saved: Mapping[str, Any], current: Config) -> tuple[list[str], list[str]]:
    """Compare the configuration a checkpoint was saved with (its public dict, as in the
    manifest) with ``current``: ``(fixed, logged)`` lists of ``--flag OLD -> NEW`` for the options
    whose value differs, split by their ``resume`` class (see :func:`_opt`). Options the saved
    configuration does not name (an older distrib) are not compared."""
    fixed: list[str] = []
    logged: list[str] = []
    for name, value in current.to_public_dict().items():
        kind = OPTION_INDEX[name][1].metadata["resume"]
        if kind == "ignored" or name not in saved or _same(saved[name], value):
            continue
        text = f"{flag_name(name)} {_show_value(saved[name])} -> {_show_value(value)}"
        (fixed if kind == "fixed" else logged).append(text)
    return fixed, logged


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) \
            and not isinstance(old, bool) and not isinstance(new, bool):
        return float(old) == float(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    return bool(old == new)


def _show_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


OPTION_INDEX: dict[str, tuple[str, dataclasses.Field[Any]]] = {
    f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}
_ALIASES = {flag[2:].replace("-", "_"): name for name, flag in _FLAG_OVERRIDES.items()}


def _build(values: Mapping[str, Any]) -> Config:
    """Construct every section from already type-checked option values (validates them)."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        sections[OPTION_INDEX[name][0]][name] = value
    return Config(**{s: SECTIONS[s](**kw) for s, kw in sections.items()})


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), list(OPTION_INDEX), n=1)
    return f" (did you mean {flag_name(close[0])}?)" if close else ""


def _canonical(key: object) -> str:
    name = str(key).replace("-", "_")
    return _ALIASES.get(name, name)


def _flatten(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = _canonical(key)
        if name in SECTIONS and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                sub = _canonical(sub_key)
                if OPTION_INDEX.get(sub, ("",))[0] != name:
                    raise ConfigError(f"{source}: unknown option {sub_key!r} in [{key}]{_suggest(sub)}")
                flat[sub] = sub_value
        elif name in OPTION_INDEX:
            flat[name] = value
        else:
            raise ConfigError(f"{source}: unknown option {key!r}{_suggest(name)}")
    return flat


def _field_type(f: dataclasses.Field[Any]) -> tuple[Any, bool]:
    """The field's base type and whether it is optional (``X | None``)."""
    hint = typing.get_type_hints(SECTIONS[OPTION_INDEX[f.name][0]])[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    """Check a value from a TOML file or dict against the field's type (ints widen to floats)."""
    base, optional = _field_type(f)
    where = f"{source}: {f.name.replace('_', '-')}"
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    if f.metadata["steps"] and type(value) is not str:  # save-every-steps = 200
        if type(value) is int:
            return str(value)
        raise ConfigError(f"{where}: expected a number of steps or a word (auto, off), got "
                          f"{value!r}")
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base in (int, str, bool) and type(value) is base:
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce_scalar(float, v, where) for v in value)
    if origin is dict and isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    raise ConfigError(f"{where}: expected {_type_word(base, optional)}, got {value!r}")


def _coerce_scalar(kind: type, value: Any, where: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _type_word(base: Any, optional: bool) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    word = words.get(base, "a list" if typing.get_origin(base) is tuple else "a table")
    return word + (" (or omit it)" if optional else "")


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, suggest a close flag, and exit with code 2."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].split()
            first = next((b for b in bad if b.startswith("--")), bad[0] if bad else "")
            message += _suggest(first.lstrip("-").split("=")[0]) if first.startswith("--") else ""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_key_value(text: str) -> tuple[str, str]:
    """An argparse ``type`` for ``KEY=VALUE`` options (``--task-arg``, ``--storage-option``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parse_pair(text: str) -> tuple[float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, got {text!r}")
    return parts


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "off") else kind(text)
    convert.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return convert


def _number(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    convert.__name__ = kind.__name__
    return convert


def build_parser(prog: str = "python -m distrib.train",
                 extra: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> argparse.ArgumentParser:
    """The command-line parser generated from the config sections.

    Every option's default is ``SUPPRESS`` so that only flags actually given override the file.
    """
    parser = _Parser(prog=prog, allow_abbrev=False, usage="%(prog)s [options]",
                     description="Train a model with DDP; checkpoints and resumes automatically.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.toml", default=None,
                        help="read options from a TOML file (command-line flags override it)")
    if extra is not None:
        extra(parser)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(SECTION_TITLES[section])
        for f in dataclasses.fields(cls):
            _add_option(group, f)
    return parser


def _default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default value (from its factory if it has one)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field[Any]) -> None:
    base, optional = _field_type(f)
    meta = f.metadata
    default = _default(f)
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = f"{meta['help']} (default: {shown if shown != {} else 'none'})"
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    if base is bool:
        group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        return
    if typing.get_origin(base) is dict:
        group.add_argument(flag_name(f.name), type=parse_key_value, action="append", **kw)
        return
    if typing.get_origin(base) is tuple:
        kind: Callable[[str], Any] = _parse_pair
    elif base in (int, float):
        kind = _number(base)
    else:
        kind = str
    if meta["choices"]:
        kw["choices"] = meta["choices"]
    group.add_argument(flag_name(f.name), type=_optional(kind) if optional else kind, **kw)


def markdown_options() -> str:
    """The README's option tables (one per section), generated from the declarations."""
    out = []
    for section, cls in SECTIONS.items():
        title = SECTION_TITLES[section]
        out += [f"**{title[0].upper()}{title[1:]}**", "", "| flag | default | meaning |",
                "|---|---|---|"]
        for f in dataclasses.fields(cls):
            base, optional = _field_type(f)
            default = _default(f)
            shown = ("off" if default is None else "none" if default == {} else
                     ",".join(map(str, default)) if isinstance(default, tuple) else str(default))
            flag = flag_name(f.name)
            if base is bool:
                flag = f"{flag} / --no-{flag[2:]}"
            elif f.metadata["choices"]:
                flag = f"{flag} {{{','.join(f.metadata['choices'])}}}"
            # <placeholders> would read as HTML tags: code spans
            meaning = re.sub(r"([^\s(]*<[a-z_-]+>[^\s;,)]*)", r"`\1`", f.metadata["help"])
            out.append(f"| `{flag}` | `{shown}` | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file; any problem is a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_TOML + 1)
        if len(data) > _MAX_TOML:
            raise ConfigError(f"--config: {path} is larger than {_MAX_TOML >> 20} MB")
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} is nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None


_MAX_TOML = 1 << 20


def config_from_namespace(ns: argparse.Namespace) -> Config:
    """Merge defaults < ``--config`` file < flags given on the command line."""
    values: dict[str, Any] = {}
    path = getattr(ns, "config", None)
    if path:
        for name, value in _flatten(read_toml(path), path).items():
            values[name] = _coerce(OPTION_INDEX[name][1], value, path)
    for name in OPTION_INDEX:
        if hasattr(ns, name):  # given on the command line (defaults are SUPPRESSed)
            value = getattr(ns, name)
            values[name] = dict(value) if isinstance(value, list) else value
    return _build(values)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv``; on a bad flag argparse exits with code 2, a bad value raises ConfigError."""
    return config_from_namespace(build_parser().parse_args(argv))
