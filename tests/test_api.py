"""The Python API behaves like the command line: seeding, dict inputs, a finished run's result,
exit codes, and one epoch convention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from distrib import Config, ConfigError, Task, Trainer, exit_code
from distrib.checkpoint.storage import LocalStorage
from distrib.checkpoint.store import CheckpointStore, SaveFailedError
from distrib.runtime.preemption import Preempted

from .tasks import tiny

ARGS = ["--task", "tests.tasks:tiny", "--max-epochs", "2", "--no-progress", "--no-early-stop",
        "--log-every-steps", "0"]


def _config(ck: Path, *extra: str) -> Config:
    return Config.from_args(ARGS + ["--checkpoint-dir", str(ck), *extra])


class KeywordModel(nn.Module):
    """Takes its inputs as keyword arguments, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(hidden.mean(dim=1))  # type: ignore[no-any-return]


class Tokens(Dataset[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = torch.tensor([(i * 7 + k) % 16 for k in range(5)])
        return {"input_ids": ids, "attention_mask": torch.ones(5)}, torch.tensor(i % 3)


def _keyword_task(config: Config) -> Task:
    return Task(model=KeywordModel(), train_dataset=Tokens(), val_dataset=Tokens(),
                loss_fn=nn.CrossEntropyLoss())


def test_a_mapping_of_inputs_goes_in_as_keyword_arguments(tmp_path: Path) -> None:
    result = Trainer(_config(tmp_path), task=_keyword_task).fit()
    assert result.stop_reason == "max_epochs" and result.history[-1]["val_loss"] > 0
    assert result.model is not None
    assert set(result.model.state_dict()) == {"embed.weight", "head.weight", "head.bias"}


def test_a_task_forward_hook_calls_the_model_any_other_way(tmp_path: Path) -> None:
    calls: list[Any] = []

    def build(config: Config) -> Task:
        task = _keyword_task(config)
        task.forward = lambda model, inputs: (calls.append(1),
                                              model(inputs["input_ids"], inputs["attention_mask"]))[1]
        return task

    Trainer(_config(tmp_path), task=build).fit()
    assert calls


def test_a_builder_is_seeded_like_the_command_line(tmp_path: Path) -> None:
    """Whatever the global RNG held before, Trainer(config, task=build) starts from the weights
    --seed gives."""
    models = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # a script may have drawn random numbers before
        result = Trainer(_config(tmp_path / str(i)), task=tiny).fit()
        assert result.model is not None
        models.append(result.model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_a_finished_run_returns_a_complete_result(tmp_path: Path) -> None:
    first = Trainer(_config(tmp_path), task=tiny).fit()
    again = Trainer(_config(tmp_path), task=tiny).fit()
    assert again.stop_reason == "already_complete"
    assert again.history == first.history and again.epochs == first.epochs == 2
    assert again.global_step == first.global_step and again.model is not None
    assert first.model is not None
    final = first.model.state_dict()
    assert all(torch.equal(final[k], again.model.state_dict()[k]) for k in final)


def test_epochs_count_from_one_where_users_see_them(tmp_path: Path) -> None:
    result = Trainer(_config(tmp_path, "--early-stop", "--patience", "1", "--lr", "0.5",
                             "--max-epochs", "6"), task=tiny).fit()
    assert result.best_epoch is not None and 1 <= result.best_epoch <= result.epochs
    best = min(range(len(result.history)), key=lambda i: result.history[i]["val_loss"])
    assert result.best_epoch == best + 1  # history[0] is epoch 1
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    epochs = [i.manifest.meta.epoch for i in store.scan() if i.manifest is not None]
    assert epochs[-1] == result.epochs and min(epochs) >= 1  # end-of-epoch saves: that epoch
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["reason"] == "finished" and progress["epoch"] == result.epochs
    segment = next((tmp_path / "logs").glob("records-*.jsonl")).read_text().splitlines()
    end = json.loads(segment[-1])
    assert end["kind"] == "end" and end["epoch"] == result.epochs


@pytest.mark.parametrize("raised, code", [
    (None, 0), (ConfigError("--lr: must be > 0"), 2), (Preempted(5, "SIGTERM"), 75),
    (SaveFailedError("3 consecutive saves failed"), 1), (RuntimeError("boom"), 1),
    (KeyboardInterrupt(), 1), (SystemExit(2), 2),
])
def test_exit_code_maps_what_main_raised(raised: BaseException | None, code: int, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DISTRIB_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")

    def main() -> None:
        if raised is not None:
            raise raised

    assert exit_code(main, prog="train.py") == code
    assert (tmp_path / "rank-1").read_text() == str(code)
    if isinstance(raised, ConfigError):
        assert capsys.readouterr().err == "train.py: error: --lr: must be > 0\n"


def test_a_task_arg_the_builder_never_reads_is_refused(tmp_path: Path) -> None:
    def build(config: Config) -> Task:
        config.train.task_args.get("samples")
        return tiny(config)

    config = _config(tmp_path, "--task-arg", "sample=3")
    with pytest.raises(ConfigError, match="does not use 'sample' .it reads: depth, .*samples"):
        Trainer(config, task=build).fit()
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
