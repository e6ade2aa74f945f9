"""The experiments behind reports/quant-accuracy.md "8-bit embeddings and lm_head": perplexity of one
loaded model with its embedding table / lm_head replaced in place by a rounded copy (fake quantization:
everything else, calibration included, stays the same tensors), on the first ``--windows`` windows of
the held-out pydoc text (as ``natix-quant eval --ppl pydoc --ppl-windows N``). JSONL to stdout.

    python scripts/vocab8_fakequant.py /tmp/w16 int8:16 16:int8 int8:int8 fp8:fp8 int4g64:int4g64 noise1:16
    python scripts/vocab8_fakequant.py /tmp/bf16 --hf int8:16 16:int8 fp8:16   # a merged bf16 model (untied here)

Variants ``EMBED:HEAD``: ``16`` unchanged; ``int8`` symmetric absmax per row (natix's format);
``int8gG`` the same per group of G; ``fp8`` e4m3 with an absmax scale per row; ``int4gG`` symmetric
int4 per group of G; ``noiseS`` Gaussian noise of the int8 rounding error's per-row variance (step²/12),
seed S — a perturbation as large as int8's with none of its structure.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def int_rows(w: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    v, d = w.shape
    g = group or d
    qmax = 2 ** (bits - 1) - 1
    x = w.float().reshape(v, d // g, g)
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return ((x / s).round().clamp(-qmax - (bits < 8), qmax) * s).reshape(v, d).to(w.dtype)


def fp8_rows(w: torch.Tensor) -> torch.Tensor:
    s = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448
    return ((w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(w.dtype)


def noise(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    step = w.float().abs().amax(1, keepdim=True) / 127
    return (w.float() + torch.randn(w.shape, generator=g) * step / 12 ** 0.5).to(w.dtype)


def variant(name: str):
    if name == "16":
        return None
    if name == "int8":
        return lambda w: int_rows(w, 8)
    if name.startswith("int8g"):
        return lambda w: int_rows(w, 8, int(name[5:]))
    if name.startswith("int4g"):
        return lambda w: int_rows(w, 4, int(name[5:]))
    if name == "fp8":
        return fp8_rows
    if name.startswith("noise"):
        return lambda w: noise(w, int(name[5:]))
    raise SystemExit(f"unknown variant {name}")


def main() -> None:
    from natix.quant.evaluate import perplexity, read_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--hf", action="store_true", help="a plain HF directory (fp32), not a natix artifact")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    if args.hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    else:
        from natix.quant.loader import load_artifact

        model, tok = load_artifact(args.model)
    text = read_text("pydoc")
    emb, head = model.model.embed_tokens, model.lm_head
    e0, h0 = emb.weight.data.clone(), head.weight.data.clone()
    for v in args.variants:
        fe, fh = (variant(x) for x in v.split(":"))
        emb.weight.data = fe(e0) if fe else e0
        head.weight.data = fh(h0) if fh else h0
        t0 = time.time()
        r = perplexity(model, tok, text, max_length=512, max_windows=args.windows)
        err = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        print(json.dumps({"model": args.model, "variant": v, "ppl": r["ppl"], "tokens": r["tokens"],
                          "embed_rel_err": err(emb.weight.data, e0), "head_rel_err": err(head.weight.data, h0),
                          "s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
