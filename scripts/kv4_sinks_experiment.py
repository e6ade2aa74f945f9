"""Experiment (not product code): how much would keeping each sequence's first tokens (attention
sinks) at 16 bits in the KV4 cache buy? Reference path only.

    python scripts/kv4_sinks_experiment.py ARTIFACT [ARTIFACT ...] --sink 4 --jsonl reports/kv4-sinks.jsonl

For every artifact (a w4a8kv4 export with ``kv_cache: int4``) and every sink count in ``--sinks``
(default ``0,4``; 0 is the artifact as it is), it measures what ``natix-quant eval`` measures —
perplexity on the held-out pydoc windows (every window is a fresh sequence, read as decode reads it)
and chain_sum greedy accuracy through the hf engine — with the reference KV4 cache
(:func:`natix.quant.kv_quant.new_cache`) patched so that the first ``sink`` positions of every layer
are stored unquantized; every later token is quantized as before (key rotation included when the
artifact has it). The patch replaces ``new_cache`` in this process only.

The hf engine left-pads a batch, so "the first positions" of a padded row would be padding: the
task runs with batch size 1 here (each prompt alone; the sink is the prompt's first tokens, the
chat template's), the sink-0 row too, so the rows of one artifact are paired on equal terms. Those
batch-1 numbers can differ slightly from ``quant-accuracy.md``'s batched ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sink_cache_class(sink: int) -> type:
    """A subclass of the reference KV4 cache whose first ``sink`` positions per layer stay 16-bit."""
    from transformers import DynamicCache

    from natix.quant.kv_quant import fake_quant_int4, fake_quant_int4_rotated, quantized_cache_class

    base = quantized_cache_class()

    class SinkKVCache(base):  # type: ignore[misc, valid-type]
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            n0 = self.get_seq_length(layer_idx)
            if n0 >= sink or self.natix_kv_mode != "int4":
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            raw = (key_states, value_states) if self.natix_prefill == "unquantized" and n0 == 0 else None
            rot, ng = self.natix_key_rotation, self.natix_kv_groups
            kq = fake_quant_int4(key_states, ng) if rot is None else fake_quant_int4_rotated(key_states, rot, ng)
            vq = fake_quant_int4(value_states, ng)
            m = sink - n0  # leading positions of this update inside the sink: kept as they are
            kq[..., :m, :] = key_states[..., :m, :]
            vq[..., :m, :] = value_states[..., :m, :]
            stored = DynamicCache.update(self, kq, vq, layer_idx, *args, **kwargs)
            return raw if raw is not None else stored

    return SinkKVCache


def patch_new_cache(sink: int) -> None:
    import natix.quant.kv_quant as kv

    original = getattr(kv, "_natix_original_new_cache", kv.new_cache)
    kv._natix_original_new_cache = original
    if sink == 0:
        kv.new_cache = original
        return
    cls = sink_cache_class(sink)

    def new_cache(model, prefill="quantized"):
        cache = original(model, prefill=prefill)
        if cache is not None and cache.natix_kv_mode == "int4":
            cache.__class__ = cls
        return cache

    kv.new_cache = new_cache


def measure(artifact: str, sink: int, args: argparse.Namespace) -> dict:
    from natix.bench.matrix import Matrix, Variant
    from natix.bench.runner import run_matrix
    from natix.quant.evaluate import perplexity, read_text, summarize_cells
    from natix.quant.loader import load_artifact

    patch_new_cache(sink)
    row: dict = {"artifact": artifact, "label": Path(artifact).name, "sink": sink, "batch_size": 1,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.time()
    model, tok = load_artifact(artifact)
    row["rotate_keys"] = bool(getattr(model, "natix_kv_rotate_keys", False))
    row["perplexity"] = perplexity(model, tok, read_text("pydoc"), max_length=512, max_windows=args.ppl_windows)
    del model
    matrix = Matrix(name="sinks", task="chain_sum", items=args.items, model=artifact,
                    variants=(Variant("model", None),), strategies=("greedy",), temperatures=(0.7,),
                    engines=("hf",), batch_sizes=(1,))
    with tempfile.TemporaryDirectory(prefix="natix-sinks-") as tmp:
        cells = run_matrix(matrix, Path(tmp), progress=False, log=lambda _s: None, isolate=False)
    row["task"] = {"name": "chain_sum", "strategies": summarize_cells(cells)}
    row["env"] = cells[0]["env"] if cells else None
    row["seconds"] = time.time() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--sinks", default="0,4")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--jsonl", default=str(ROOT / "reports" / "kv4-sinks.jsonl"))
    args = ap.parse_args()
    for artifact in args.artifacts:
        for sink in (int(x) for x in args.sinks.split(",")):
            row = measure(artifact, sink, args)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            g = row["task"]["strategies"]["greedy"]
            print(f"{row['label']} sink={sink}: ppl {row['perplexity']['ppl']:.3f}, greedy {g['accuracy']:.1%} "
                  f"({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
