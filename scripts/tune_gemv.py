"""Tune and time the W4A8 GEMV (M = 1) against the W4A8 GEMM and bf16 on the engine's shapes, one GPU run.

    python scripts/tune_gemv.py --out out.jsonl --table out_w4a8_gemv.json [--deadline 240]

Timing as scripts/bench_kernels.py: the median of CUDA-graph replays, each replay calling the op on
rotated weight sets (>= 200 MB touched, so the weights come from HBM, not L2), per call in µs. Every
candidate is checked exact against the reference before it is timed. The best candidate per
(variant, N, K) goes into the table (kernels/configs/w4a8_gemv.json's format, keyed by device) if it
beats the GEMM at M = 1; W4A8Gemm runs the GEMV only for shapes in the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_engine import Out, environment  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
DEV = torch.device("cuda")


def graph_us(fns: list, reps: int = 10) -> float:
    g = torch.cuda.CUDAGraph()
    for f in fns:
        f()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(ts)


def main() -> None:
    from natix.kernels.packing import quantize_channel, quantize_progressive
    from natix.kernels.rmsnorm_quant import quantize_per_token
    from natix.kernels.w4a8_gemm import device_key, w4a8_gemm_reference
    from natix.kernels.w4a8_launch import W4A8Gemm
    import natix.kernels.w4a8_gemv as gv

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--deadline", type=float, default=240.0)
    p.add_argument("--variants", default="channel,g128")
    a = p.parse_args()
    out = Out(a.out, environment())
    t_end = time.perf_counter() + a.deadline
    table: dict = {}
    orig = gv.gemv_config
    for variant in a.variants.split(","):
        for n, k in SHAPES:
            if time.perf_counter() > t_end:
                break
            q = quantize_progressive if variant == "g128" else quantize_channel
            sets = max(2, -(-200 * 2**20 // (n * k // 2)))
            ws = [q(torch.randn(n, k, device=DEV) * 0.02) for _ in range(sets)]
            bf = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(max(2, sets // 4))]
            x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            xq, xs, xsum = quantize_per_token(x)
            ref = w4a8_gemm_reference(xq, xs, ws[0], None, torch.int32)
            gemm = [W4A8Gemm(w, gemv=False) for w in ws]
            t_gemm = graph_us([lambda g=g: g(xq, xs, xsum) for g in gemm])
            t_bf16 = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf])
            best = None
            for bnh, split, warps, stages in itertools.product((16, 32, 64), (1, 2, 4, 8), (4,), (3,)):
                if time.perf_counter() > t_end:
                    break
                cfg = dict(BNH=bnh, BK=128, SPLIT_K=split, num_warps=warps, num_stages=stages)
                gv.gemv_config = lambda *_a, c=cfg: dict(c)
                try:
                    raw = W4A8Gemm(ws[0], out_dtype=torch.int32)
                    if not torch.equal(raw(xq, xs, xsum), ref):
                        out(kind="gemv_cfg", variant=variant, n=n, k=k, cfg=cfg, error="not exact")
                        continue
                    gs = [W4A8Gemm(w) for w in ws]
                    t = graph_us([lambda g=g: g(xq, xs, xsum) for g in gs])
                except Exception as e:  # noqa: BLE001
                    out(kind="gemv_cfg", variant=variant, n=n, k=k, cfg=cfg, error=f"{type(e).__name__}: {e}")
                    continue
                finally:
                    gv.gemv_config = orig
                out(kind="gemv_cfg", variant=variant, n=n, k=k, cfg=cfg, us=round(t, 2))
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best and best[0] < t_gemm:  # the table holds measured wins only
                table.setdefault(variant, {})[f"{n},{k}"] = best[1]
            if best:
                bytes_ = n * k // 2
                out(kind="gemv", variant=variant, n=n, k=k, gemv_us=round(best[0], 2), gemm_us=round(t_gemm, 2),
                    bf16_us=round(t_bf16, 2), speedup_vs_gemm=round(t_gemm / best[0], 3),
                    speedup_vs_bf16=round(t_bf16 / best[0], 3), gbps=round(bytes_ / best[0] / 1e3, 1), cfg=best[1])
            del ws, bf, gemm
            torch.cuda.empty_cache()
    with open(a.table, "w") as f:
        json.dump({device_key(DEV): table}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
