"""Tasks a user recognises, small enough to train on two CPU cores (see the README's "Examples").

Run them from the repository root, e.g. ``torchrun --nproc_per_node=2 -m distrib.train --task
examples.gpt2_tokens:build``.
"""
