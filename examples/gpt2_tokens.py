"""A Hugging Face GPT-2 (randomly initialised, tied input and output embeddings) learning a
synthetic token language, with dict inputs and data-loader workers::

    torchrun --nproc_per_node=2 -m distrib.train --task examples.gpt2_tokens:build \
        --num-workers 2 --max-epochs 3

Each item is ``({"input_ids": ..., "attention_mask": ...}, labels)``: distrib calls the model as
``model(**inputs)``, the way Hugging Face models take their inputs, so no wrapper is needed and
exported weights keep the model's own names (``python -m distrib.ckpt export DIR m.safetensors``
loads strictly into a fresh ``GPT2LMHeadModel``). The sequences are generated from the index and
the seed (nothing is downloaded): each continues a random start with a fixed rule, so the model
has something to learn. Needs ``pip install transformers``.

``--task-arg`` keys: ``samples`` (training sequences), ``length``, ``vocab``, ``layers``, ``width``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from distrib import Config, ConfigError, Task
from distrib.tasks import task_arg


class Tokens(Dataset[tuple[dict[str, torch.Tensor], torch.Tensor]]):
    """Sequences whose next token follows the previous two: (a + 3 b) mod vocab, deterministic
    in (seed, index) so that data-loader workers and resumes see the same data."""

    def __init__(self, seed: int, samples: int, length: int, vocab: int) -> None:
        self.seed, self.samples, self.length, self.vocab = seed, samples, length, vocab

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.empty(self.length, dtype=torch.long)
        ids[:2] = torch.randint(0, self.vocab, (2,), generator=g)
        for i in range(2, self.length):
            ids[i] = (ids[i - 2] + 3 * ids[i - 1]) % self.vocab
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()


def next_token_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens up to t."""
    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def token_accuracy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: the fraction of next tokens predicted exactly (from position 2 on, where the
    rule determines them)."""
    predicted = output.logits[:, 1:-1].argmax(dim=-1)
    return (predicted == labels[:, 2:]).float().mean(dim=1)


def build(config: Config) -> Task:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ConfigError("--task: examples.gpt2_tokens needs the transformers package "
                          "(pip install transformers)") from None
    samples = task_arg(config, "samples", int, 512, lo=16, hi=10**6)
    length = task_arg(config, "length", int, 24, lo=4, hi=1024)
    vocab = task_arg(config, "vocab", int, 64, lo=4, hi=65536)
    layers = task_arg(config, "layers", int, 2, lo=1, hi=48)
    width = task_arg(config, "width", int, 64, lo=8, hi=4096)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width,
                                       n_layer=layers, n_head=2, bos_token_id=0,
                                       eos_token_id=0, tie_word_embeddings=True))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    seed = config.train.seed
    return Task(model=model, train_dataset=Tokens(seed, samples, length, vocab),
                val_dataset=Tokens(seed + 1, max(16, samples // 8), length, vocab),
                loss_fn=next_token_loss, metrics={"token_accuracy": token_accuracy})
