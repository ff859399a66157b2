"""Checks that run before any process group exists and before anything is written.

:func:`check_locations` is what ``python -m distrib.train`` (and ``--check-config``) and
:meth:`distrib.Trainer.fit` both call: every URL's scheme is known, its storage options are
accepted, the checkpoint directory is (or can be created as) a writable directory, an object
store's bucket exists and the credentials work, an explicit ``--resume`` checkpoint exists, and
``--tensorboard`` has its package. Each problem is a :class:`~distrib.config.ConfigError` with one
line naming the flag. Nothing is created or written.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from distrib.checkpoint.storage import StorageError, check_url, open_storage, parse_options
from distrib.config import Config, ConfigError


def check_locations(config: Config) -> None:
    """See the module docstring. Local and cheap; call it on every rank."""
    options = parse_options(config.ckpt.storage_options)
    _probe("--checkpoint-dir", config.ckpt.checkpoint_dir, options)
    if config.log.log_dir:
        _probe("--log-dir", config.log.log_dir, options)
    resume = config.ckpt.resume
    if resume not in ("auto", "never"):
        _check_resume(resume, options)
    if config.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard: the tensorboard package is not installed "
                          "(pip install 'distrib[tensorboard]')")


def _open(flag: str, url: str, options: dict[str, Any]) -> Any:
    try:
        check_url(url)
        return open_storage(url, options)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{flag}: a --storage-option is not accepted: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{flag}: {url}: {type(exc).__name__}: {exc}") from None


def _probe(flag: str, url: str, options: dict[str, Any]) -> None:
    problem = _open(flag, url, options).probe()
    if problem:
        raise ConfigError(f"{flag}: {problem}")


def _check_resume(url: str, options: dict[str, Any]) -> None:
    root, _, name = url.rstrip("/").rpartition("/")
    if not re.fullmatch(r"step-\d{9,18}", name):
        raise ConfigError(f"--resume: {url} is not a step-N checkpoint directory (or use auto "
                          "or never)")
    storage = _open("--resume", root or ".", options)
    try:
        present = storage.exists(f"{name}/manifest.json")
    except (StorageError, OSError) as exc:
        raise ConfigError(f"--resume: {url}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # credentials, network: one line
        raise ConfigError(f"--resume: {url}: {type(exc).__name__}: {exc}") from None
    if not present:
        raise ConfigError(f"--resume: {url} holds no committed checkpoint")
