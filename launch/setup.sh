#!/usr/bin/env bash
# Set up a virtual environment with distrib installed (editable) and PyTorch pinned exactly.
#
#   bash launch/setup.sh [EXTRAS]      e.g.  bash launch/setup.sh test    or    bash launch/setup.sh s3
#
# Environment overrides:
#   VENV=.venv               where the environment lives (created if missing, reused otherwise)
#   TORCH_VERSION=2.13.0     the exact torch version, installed FIRST so that resolving distrib's
#                            loose "torch>=2.4" never pulls a multi-GB CUDA build you did not ask for
#   TORCH_INDEX_URL=...      e.g. https://download.pytorch.org/whl/cpu or .../whl/cu124
#   PYTHON=python3           the interpreter that creates the environment
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
    echo "+ $PYTHON -m venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# --no-compile, then one compileall over every core below: pip byte-compiles each package on one
# core (most of this script's time for the test extra); the same .pyc files, in parallel
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile)

torch_cmd=("${PIP[@]}" "torch==$TORCH_VERSION")
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_cmd+=(--index-url "$TORCH_INDEX_URL")
fi
echo "+ ${torch_cmd[*]}"
"${torch_cmd[@]}"

target="."
if [ -n "$EXTRAS" ]; then
    target=".[$EXTRAS]"
fi
echo "+ ${PIP[*]} -e $target"
"${PIP[@]}" -e "$target"
echo "+ $VENV/bin/python -m compileall -q -j 0 <site-packages>"
# a few packages ship files that do not compile (templates, other Python versions' code); pip
# skips them the same way, so the exit status is not an error
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
echo "distrib is installed in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
