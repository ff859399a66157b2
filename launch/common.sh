# Helpers shared by launch/local.sh and launch/multinode.sh (sourced, not run).

PROG=$(basename "$0")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

# fail MESSAGE: one line on stderr, exit 2 (distrib's "permanent error": retrying cannot help)
fail() {
    echo "$PROG: $*" >&2
    exit 2
}

# require NAME...: fail unless every named variable is set and non-empty
require() {
    local name
    for name in "$@"; do
        [ -n "${!name:-}" ] || fail "$name is not set ($SOURCE_HINT)"
    done
}

# require_count NAME VALUE: fail unless VALUE is a positive integer
require_count() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 must be a positive integer (got '$2')"
}

# gpu_count_or FALLBACK: the number of CUDA devices torch sees, or FALLBACK without any
gpu_count_or() {
    "$PYTHON" -c "import torch; print(torch.cuda.device_count() or $1)" 2>/dev/null \
        || fail "$PYTHON cannot import torch (run launch/setup.sh first, or set PYTHON)"
}

# run COMMAND...: print it, then replace this shell with it (so signals reach it directly),
# or only print it when DRY_RUN=1
run() {
    echo "+ $*" >&2
    if [ "${DRY_RUN:-0}" = 1 ]; then
        exit 0
    fi
    exec "$@"
}
SOURCE_HINT="see the comments at the top of $PROG"
