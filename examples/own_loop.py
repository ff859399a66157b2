"""Your own training loop, made fault tolerant with :class:`distrib.CheckpointManager`.

A nanoGPT-style loop written as plain PyTorch: a small GPT, AdamW, a cosine schedule with
warmup, gradient accumulation, bf16 autocast, DDP. The lines marked ``# distrib`` are all it
takes to get atomic verified checkpoints, bit-exact resume mid-run, coordinated emergency saves
on SIGTERM/SIGUSR1 (exit 75), automatic resume and a COMPLETE marker::

    torchrun --nproc_per_node=2 examples/own_loop.py --checkpoint-dir runs/gpt
    python -m distrib.launch --standalone --nproc_per_node=2 examples/own_loop.py --checkpoint-dir runs/gpt
    python -m distrib.ckpt export runs/gpt gpt.safetensors

The data is a synthetic token corpus; each rank draws its batches with the global torch RNG
(seeded per rank), which the manager saves and restores with everything else.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import distrib  # distrib


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    if min(args.max_steps, args.batch_size, args.grad_accum) < 1 or args.save_every < 0 \
            or not 0 < args.lr < math.inf:
        parser.error("--max-steps, --batch-size and --grad-accum must be >= 1, --save-every >= 0 "
                     "and --lr a positive number")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        tdist.init_process_group("gloo")
    rank = tdist.get_rank() if ddp else 0
    vocab, block = 64, 32
    g = torch.Generator().manual_seed(0)  # a corpus with structure: mostly a fixed successor
    successor, noise = torch.randperm(vocab, generator=g), torch.rand(20_000, generator=g)
    corpus = torch.zeros(20_000, dtype=torch.long)
    for i in range(1, len(corpus)):
        corpus[i] = successor[corpus[i - 1]] if noise[i] < 0.9 else int(noise[i] * 1e6) % vocab

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model: nn.Module = GPT(vocab, block, width=64, layers=2, heads=4)
    if ddp:
        model = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.max_steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.max_steps)))))
    torch.manual_seed(args.seed + 1 + rank)  # each rank draws its own batches

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(corpus) - block - 1, (args.batch_size,))
        x = torch.stack([corpus[j:j + block] for j in i.tolist()])
        y = torch.stack([corpus[j + 1:j + block + 1] for j in i.tolist()])
        return x, y

    ckpt = distrib.CheckpointManager(args.checkpoint_dir, {  # distrib
        "model": model, "optimizer": optimizer, "scheduler": scheduler},  # distrib
        save_every_steps=args.save_every, config=vars(args))  # distrib
    start = ckpt.resume()  # distrib
    for step in range(start.step, args.max_steps):  # distrib: was range(args.max_steps)
        for micro in range(args.grad_accum):
            x, y = get_batch()
            last = micro == args.grad_accum - 1
            sync = model.no_sync() if ddp and not last else torch.enable_grad()  # type: ignore[operator]
            with sync, torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
                loss = F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step + 1) % 50 == 0:
            logging.getLogger("own_loop").info("step %d: loss %.4f", step + 1, loss.item())
        ckpt.step_done(step + 1)  # distrib: saves when due, acts on preemption
    ckpt.finish(args.max_steps)  # distrib: the final checkpoint and COMPLETE
    ckpt.close()  # distrib
    if ddp:
        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(distrib.exit_code(main))  # distrib: exit 0 / 1 / 2 / 75 (preempted)
