#!/usr/bin/env bash
# On the GPU machine (no `pip install -e .` there): make `natix` importable from this checkout through a
# folder of natix/<part> symlinks on PYTHONPATH, then run the given command. PYTHONSAFEPATH keeps the
# repo root (whose kernels/ folder transformers would take for the PyPI package `kernels`) off sys.path.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /tmp/natix-path/natix
for p in quant kernels engines scaling bench; do ln -sfn "$ROOT/$p" "/tmp/natix-path/natix/$p"; done
export PYTHONPATH=/tmp/natix-path${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
cd "$ROOT"
exec "$@"
