"""Peak memory of ``natix-quant export``, against the size of the model in bf16.

    python scripts/export_memory.py --model smollm2 --scheme gptq
    python scripts/export_memory.py --model llama-1b --scheme w4a8kv4 --calib-samples 16
    python scripts/export_memory.py --model llama3-8b --layers 8 --scheme w4a8kv4 --extra="--device cuda"

Each export runs in a fresh child process; its peak resident set (``ru_maxrss`` of the child) is
compared with the bf16 parameter bytes. ``llama-1b`` is a random-weight Llama with TinyLlama-1.1B's
shape (hidden 2048, 22 layers, 32/4 heads, MLP 5632) and SmolLM2's tokenizer/vocabulary (49152),
saved once in bf16. ``llama3-8b`` has Llama-3-8B's decoder shape (hidden 4096, 32/8 heads, MLP 14336)
with ``--layers`` of its 32 layers (the export is layer by layer: time per layer and the GPU peak do
not depend on the depth) and SmolLM2's vocabulary. With ``--extra="--device cuda"`` the child also
reports the GPU's peak allocated memory. Results are appended as JSON lines to --jsonl (with the environment).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries ru_maxrss across execve, so
# a child would inherit the parent's peak. RSS counts the pages of the memory-mapped source
# checkpoint (clean, file-backed: the kernel can drop them under pressure), so the anonymous part
# (RssAnon: what the export itself allocates) is sampled too; the kernel keeps no peak of it.
_CHILD = """
import json, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.02)
import torch, transformers, safetensors.torch  # noqa: F401
floor, floor_anon = status("VmHWM"), status("RssAnon")
threading.Thread(target=sample, daemon=True).start()
from natix.quant.cli import main
try:
    main(json.loads(sys.argv[1]), standalone_mode=False)
finally:
    peak_anon[0] = max(peak_anon[0], status("RssAnon"))
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"after_imports": floor, "peak": status("VmHWM"), "anon_after_imports": floor_anon,
                      "peak_anon": peak_anon[0], "gpu_peak_allocated": gpu}))
"""


SHAPES = {"llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),
          "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, rope_theta=500000.0)}


def make_llama(out: Path, shape: str, tokenizer: str = "smollm2-135m", layers: int | None = None) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from natix.quant.models import load_tokenizer

    if Path(tokenizer).is_dir():  # a saved tokenizer directory (no model in it)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = load_tokenizer(tokenizer)
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(**dims, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def param_bytes_bf16(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return 2 * sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "llama-1b", "llama3-8b"], required=True)
    ap.add_argument("--layers", type=int, help="decoder layers of a llama-* model (default: the shape's own)")
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-max-length", type=int, default=512)
    ap.add_argument("--extra", default="", help='more natix-quant export flags, one string: --extra="--device cuda"')
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer of the llama-1b model (a dir or name)")
    ap.add_argument("--work", default="/tmp/natix-memory")
    ap.add_argument("--jsonl", default=str(ROOT / "reports" / "export-memory.jsonl"))
    args = ap.parse_args()
    args.extra = shlex.split(args.extra)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        from natix.quant.models import materialize, resolve_base

        base, model_dir = "smollm2-135m", str(materialize(resolve_base("smollm2-135m")))
    else:
        name = args.model + (f"-{args.layers}l" if args.layers else "")
        base = model_dir = str(make_llama(work / name, args.model, args.tokenizer, args.layers))
    out = work / f"{args.model}-{args.scheme}"
    cli = ["export", "--base", base, "--scheme", args.scheme, "--calib", "pydoc", "--calib-samples",
           str(args.calib_samples), "--calib-max-length", str(args.calib_max_length), "--out", str(out), "--force",
           *args.extra]
    t0 = time.time()
    # the child notes its resident set once torch/transformers are imported (the floor every
    # process pays), runs the CLI, and prints both peaks as its last stdout line
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cli)], stdout=subprocess.PIPE, text=True)
    if res.returncode:  # the child's stderr (the CLI's one-line error) went to ours
        sys.exit(f"export failed (exit {res.returncode}): natix-quant {' '.join(cli)}")
    wall = time.time() - t0
    info = json.loads(res.stdout.strip().splitlines()[-1])
    peak, floor = info["peak"], info["after_imports"]
    anon = info["peak_anon"] - info["anon_after_imports"]
    cmd = "natix-quant " + " ".join(cli)
    bf16 = param_bytes_bf16(model_dir)
    from natix.bench.env import environment

    gpu = info.get("gpu_peak_allocated")
    row = {"model": args.model, "layers": args.layers, "scheme": args.scheme, "gpu_peak_allocated_bytes": gpu, "extra": args.extra, "calib_samples": args.calib_samples,
           "calib_max_length": args.calib_max_length, "peak_rss_bytes": peak, "import_floor_bytes": floor,
           "peak_anon_above_imports_bytes": anon, "anon_over_bf16": anon / bf16,
           "bf16_param_bytes": bf16, "peak_over_bf16": peak / bf16, "above_floor_over_bf16": (peak - floor) / bf16,
           "wall_s": wall, "command": cmd, "env": environment()}
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.model} {args.scheme}: bf16 model {bf16 / 2**30:.2f} GiB; peak RSS above the import floor "
          f"{(peak - floor) / 2**30:.2f} GiB = {(peak - floor) / bf16:.2f}x (incl. mapped checkpoint pages); anonymous "
          f"memory peak {anon / 2**30:.2f} GiB = {anon / bf16:.2f}x; {wall:.0f} s"
          + (f"; GPU peak allocated {gpu / 2**30:.2f} GiB" if gpu else ""))


if __name__ == "__main__":
    main()
