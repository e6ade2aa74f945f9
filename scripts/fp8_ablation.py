"""Where fp8 (W8A8 e4m3) loses perplexity on SmolLM2-135M + demo LoRA: in-process ablations.

    python scripts/fp8_ablation.py --windows 20 --variants fp32,bf16,w-channel,a-token,wa-channel

Each variant starts from the base merged with the adapter in fp32 (``natix.quant.adapters.merge_adapter``)
and then rounds every tensor to bf16 (what ``natix-quant export --dtype bf16`` and the ``bf16`` report row
store), except the ``fp32`` variant. The quantized variants replace each Linear's weight (lm_head excepted,
as the fp8 scheme ignores it) by its dequantized fp8 weight and/or quantize its input per token on the fly,
with natix's own quantizers (:mod:`natix.kernels.fp8_linear`, :mod:`natix.quant.fp8`), then compute in fp32
as the reference ``Fp8Linear`` does; perplexity is :func:`natix.quant.evaluate.perplexity` on the held-out
``pydoc`` text, the function ``natix-quant eval`` calls. The report rows themselves come from the real CLI
(``scripts/quant_accuracy.py``); this script is for the diagnosis only. Prints one JSON line per variant.

Variant names: ``fp32`` / ``bf16`` (unquantized), ``w-<how>`` weights only, ``a-token`` activations only,
``wa-<how>`` both, where ``<how>`` is ``channel`` (absmax per output channel, the scheme's old default),
``tensor`` (absmax per tensor), ``mse`` (:func:`natix.quant.fp8.search_weight_scale`, the scheme's
``weight_scale=mse``) or ``output`` (the same search weighted by E[x_k^2] of ``--calib-samples`` calibration
samples through the unquantized model: the diagonal-Hessian objective of ``weight_scale=output``, without
the export's layer-by-layer propagation of earlier layers' quantization). A suffix ``-only=a+b`` quantizes
only the Linears whose name ends in (or contains the path component) ``a`` or ``b``, ``-skip=a+b`` all but those.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="fp32,bf16,w-channel,a-token,wa-channel")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--adapter", default=str(ROOT / "bench" / "data" / "adapters" / "smollm2-chain-sum-lora"))
    ap.add_argument("--calib", default="chain_sum")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args()

    import torch
    from torch import nn

    from natix.kernels.fp8_linear import quantize_fp8_per_token
    from natix.quant.adapters import merge_adapter
    from natix.quant.evaluate import perplexity, read_text
    from natix.quant.fp8 import dequantize, quantize_weight_per_channel
    from natix.quant.models import load_base

    torch.manual_seed(0)
    base, tok = load_base("smollm2-135m", dtype="fp32")
    base, _ = merge_adapter(base, args.adapter)
    master = {k: v.detach().clone() for k, v in base.state_dict().items()}
    text = read_text("pydoc")
    names = [n for n, m in base.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]

    calib_x: dict[str, torch.Tensor] = {}

    def calib_inputs() -> dict[str, torch.Tensor]:
        """Inputs of every Linear on calibration samples (bf16 model, no quantization), for the
        output-error weight scales; capped at 4096 rows per layer."""
        if calib_x:
            return calib_x
        from natix.quant.calib import load_calibration

        samples = load_calibration(args.calib, tok, samples=args.calib_samples, max_length=512, seed=0)
        hooks = []
        for n in names:
            def hook(_m, inp, _out, n=n):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                calib_x[n] = torch.cat([calib_x[n], x])[:4096] if n in calib_x else x[:4096]
            hooks.append(base.get_submodule(n).register_forward_hook(hook))
        with torch.no_grad():
            for s in samples:
                base(input_ids=torch.tensor([s]))
        for h in hooks:
            h.remove()
        return calib_x

    for spec in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t0 = time.time()
        base.load_state_dict(master)
        hooks = []
        with torch.no_grad():
            if spec != "fp32":
                for v in base.state_dict().values():
                    v.copy_(v.to(torch.bfloat16).float())
            kind, _, rest = spec.partition("-")
            if kind in ("w", "a", "wa"):
                how, _, opt = rest.partition("-")
                skip = only = ()
                if opt.startswith("skip="):
                    skip = tuple(opt[5:].split("+"))
                if opt.startswith("only="):
                    only = tuple(opt[5:].split("+"))
                if kind == "a":
                    how = "none"
                if how in ("mse", "output"):
                    from natix.quant.fp8 import search_weight_scale
                    xs = calib_inputs() if how == "output" else {}
                for n in names:
                    if any(n.endswith(s) or f".{s}." in n + "." for s in skip):
                        continue
                    if only and not any(n.endswith(s) or f".{s}." in n + "." for s in only):
                        continue
                    lin = base.get_submodule(n)
                    w = lin.weight.data
                    if how == "channel":
                        q, s = quantize_weight_per_channel(w)
                        w.copy_(dequantize(q, s))
                    elif how == "tensor":
                        s = (w.abs().amax() / 448.0).clamp_min(1e-12)
                        w.copy_((w / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s)
                    elif how in ("mse", "output"):
                        c = xs[n].square().mean(0) if how == "output" else None
                        s = search_weight_scale(w, c)
                        q, s = quantize_weight_per_channel(w, scale=s)
                        w.copy_(dequantize(q, s))
                    elif how != "none":
                        raise SystemExit(f"unknown weight quantization {how!r}")
                    if kind in ("a", "wa"):
                        def pre(_m, inp):
                            xq, xs_ = quantize_fp8_per_token(inp[0])
                            return ((xq.float() * xs_).to(inp[0].dtype),)
                        hooks.append(lin.register_forward_pre_hook(pre))
            elif spec not in ("fp32", "bf16"):
                raise SystemExit(f"unknown variant {spec!r}")
        r = perplexity(base, tok, text, max_length=512, max_windows=args.windows)
        for h in hooks:
            h.remove()
        row = {"variant": spec, "ppl": r["ppl"], "windows": r["windows"], "tokens": r["tokens"],
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
