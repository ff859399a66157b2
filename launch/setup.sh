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
#   INSTALLER=uv             how the package and its extras are installed once torch is: uv (installed
#                            into the environment with pip; it resolves, installs and byte-compiles on
#                            every core: this script took 38-57 s with it against 77-80 s with pip for
#                            the test extra on 2 cores) or pip. uv reads its own index settings
#                            (UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_FIND_LINKS), not pip's; where uv
#                            cannot be installed, pip is used.
#   UV_VERSION=0.13.9        the exact uv version
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
INSTALLER=${INSTALLER:-uv}
UV_VERSION=${UV_VERSION:-0.13.9}
EXTRAS=${1:-}
case "$INSTALLER" in
    uv|pip) ;;
    *) echo "setup.sh: INSTALLER must be uv or pip, not '$INSTALLER'" >&2; exit 2 ;;
esac

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
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$INSTALLER" = uv ]; then
    echo "+ ${PIP[*]} uv==$UV_VERSION"
    if ! "${PIP[@]}" "uv==$UV_VERSION"; then
        echo "setup.sh: uv $UV_VERSION could not be installed; installing with pip instead" >&2
        INSTALLER=pip
    fi
fi
if [ "$INSTALLER" = uv ]; then
    # torch is already there and satisfies the package's requirement, so uv keeps it; uv
    # byte-compiles what it installs, in parallel and faster than compileall below
    echo "+ $VENV/bin/uv pip install --quiet --python $VENV/bin/python --compile-bytecode -e $target"
    "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --compile-bytecode -e "$target"
else
    echo "+ ${PIP[*]} -e $target"
    "${PIP[@]}" -e "$target"
fi
# what pip installed (torch and its dependencies: sympy, networkx, ...) is not compiled yet;
# compileall skips every file that already has its .pyc. Without them each process compiles
# sympy and the rest in memory again (PYTHONDONTWRITEBYTECODE=1 machines never write them).
# A few packages ship files that do not compile (templates, other Python versions' code); pip
# skips them the same way, so compileall's exit status is not an error.
echo "+ $VENV/bin/python -m compileall -q -j 0 <site-packages>"
"$VENV/bin/python" -m compileall -q -j 0 "$purelib" >/dev/null 2>&1 || true
echo "distrib is installed in $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
