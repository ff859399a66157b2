#!/usr/bin/env bash
# Train on this machine with N processes (one per GPU, or 2 on CPU), through distrib.launch
# (torchrun with distinct exit codes; see the README's "Fault tolerance").
#
#   bash launch/local.sh [distrib.train arguments]
#   NPROC_PER_NODE=4 bash launch/local.sh --task mypkg.mod:build --checkpoint-dir ./ck
#
# Environment:
#   NPROC_PER_NODE   processes (default: the number of GPUs, or 2 without a GPU)
#   MAX_RESTARTS     restarts of the workers after a failure (default 0)
#   PYTHON           the interpreter (default: .venv/bin/python if present, else python3)
#   DRY_RUN=1        print the command without running it
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

nproc=${NPROC_PER_NODE:-$(gpu_count_or 2)}
require_count NPROC_PER_NODE "$nproc"
run "$PYTHON" -m distrib.launch --standalone --nproc_per_node="$nproc" \
    --max-restarts="${MAX_RESTARTS:-0}" -m distrib.train "$@"
