#!/usr/bin/env bash
# Start this node's part of a multi-node job: read the rank and address variables the scheduler
# sets and run torchrun (through distrib.launch) with a c10d rendezvous on the first node.
#
#   bash launch/multinode.sh [distrib.train arguments]      on every node
#
# Where the variables come from (the first that applies):
#   Kubeflow PyTorchJob   PET_NNODES, PET_RDZV_ENDPOINT or PET_MASTER_ADDR, ... (the training
#                         operator sets them and torchrun reads them itself)
#   Kubernetes Indexed    JOB_COMPLETION_INDEX (set by Kubernetes), NNODES, RDZV_HOST
#   Job                   (pod 0's DNS name: <job>-0.<headless service>)
#   SLURM                 SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST
#   anything else         NNODES, NODE_RANK, MASTER_ADDR
# Optional everywhere:
#   NPROC_PER_NODE   processes per node (default: the number of GPUs, or 1 without a GPU)
#   RDZV_PORT        rendezvous port on the first node (default 29500; MASTER_PORT also works)
#   RDZV_ID          a name shared by the nodes of one job (default: the job's id, else "distrib")
#   MAX_RESTARTS     times torchrun re-forms the group after a failure (default 3)
#   PYTHON           the interpreter (default: .venv/bin/python if present, else python3)
#   DRY_RUN=1        print the command without running it
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

# The first host of a SLURM node list such as "gpu[003-004,010],login1" -> "gpu003".
first_slurm_host() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1" | head -n 1
        return
    fi
    local first=${1%%,*}
    if [[ "$1" =~ ^([^,\[]+)\[([^],-]+) ]]; then
        first=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
    fi
    echo "$first"
}

if [ -n "${PET_NNODES:-}" ]; then
    SOURCE_HINT="Kubeflow PyTorchJob: PET_NNODES is set"
    [ -n "${PET_RDZV_ENDPOINT:-}${PET_MASTER_ADDR:-}" ] \
        || fail "PET_RDZV_ENDPOINT or PET_MASTER_ADDR is not set ($SOURCE_HINT)"
    run "$PYTHON" -m distrib.launch -m distrib.train "$@"  # torchrun reads PET_* itself
elif [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
    SOURCE_HINT="Kubernetes Indexed Job: JOB_COMPLETION_INDEX is set"
    require NNODES RDZV_HOST
    node_rank=$JOB_COMPLETION_INDEX
    host=$RDZV_HOST
    default_id=${JOB_NAME:-distrib}
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    SOURCE_HINT="SLURM: SLURM_JOB_ID is set"
    require SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST
    NNODES=$SLURM_NNODES
    node_rank=$SLURM_NODEID
    host=$(first_slurm_host "$SLURM_JOB_NODELIST")
    default_id=$SLURM_JOB_ID
else
    SOURCE_HINT="no scheduler variables found: set NNODES, NODE_RANK and MASTER_ADDR"
    require NNODES NODE_RANK MASTER_ADDR
    node_rank=$NODE_RANK
    host=$MASTER_ADDR
    default_id=distrib
fi

require_count NNODES "$NNODES"
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$NNODES" ] \
    || fail "the node rank must be a whole number below NNODES=$NNODES (got '$node_rank')"
nproc=${NPROC_PER_NODE:-$(gpu_count_or 1)}
require_count NPROC_PER_NODE "$nproc"
port=${RDZV_PORT:-${MASTER_PORT:-29500}}

run "$PYTHON" -m distrib.launch --nnodes="$NNODES" --nproc_per_node="$nproc" \
    --node_rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$host:$port" \
    --rdzv-id="${RDZV_ID:-$default_id}" --max-restarts="${MAX_RESTARTS:-3}" \
    -m distrib.train "$@"
