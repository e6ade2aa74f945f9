"""Time the W8A16 lm_head kernel (natix.kernels.w8a16_linear) against the bf16 lm_head GEMM at a
Llama-3-8B shape (vocab 128256, hidden 4096) on one GPU; JSONL to stdout, one line per (M, variant).

    python scripts/bench_w8a16.py [--sweep]    # --sweep: also try tile configs at each M

What it measures: CUDA-event time per call (median of 50 after warm-up), and the bytes of weight read
per call over that time (the lm_head is weight-bandwidth bound at decode sizes).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch


def gpu_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    from natix.kernels.w8a16_linear import _kernel, quantize_int8_rows, w8a16_config, w8a16_linear

    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--n", type=int, default=128256)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    n, k = args.n, args.k
    dev = torch.device("cuda")
    w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
    q, s = quantize_int8_rows(w)
    wq = (q.float() * s[:, None]).to(torch.bfloat16)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    env["triton"] = triton.__version__
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        ref = torch.nn.functional.linear(x, wq)
        got = w8a16_linear(x, q, s)
        rel = float((got.float() - ref.float()).norm() / ref.float().norm())
        t_bf16 = gpu_us(lambda: torch.nn.functional.linear(x, w))
        t_w8 = gpu_us(lambda: w8a16_linear(x, q, s, check=False))
        print(json.dumps({"kind": "lm_head", "m": m, "n": n, "k": k, "bf16_us": round(t_bf16, 1),
                          "w8a16_us": round(t_w8, 1), "speedup": round(t_bf16 / t_w8, 2),
                          "w8a16_weight_GBps": round(n * k / t_w8 / 1e3, 1),
                          "bf16_weight_GBps": round(2 * n * k / t_bf16 / 1e3, 1), "rel_err_vs_bf16_dequant": rel,
                          "config": w8a16_config(m), **env}), flush=True)
        if args.sweep and m in (1, 16, 64, 256):
            best = None
            y = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            bms = (16,) if m <= 16 else (64,) if m <= 64 else (128,)
            for bm, bn, bk, nw, ns in itertools.product(bms, (32, 64, 128, 256), (64, 128, 256), (4, 8), (3, 4)):
                if bm * bn * bk > 128 * 128 * 128:
                    continue
                grid = (-(-n // bn), -(-m // bm))
                try:
                    t = gpu_us(lambda: _kernel()[grid](x, q, s, s, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
                                                       HAS_BIAS=False, DOT_F32=False, BM=bm, BN=bn, BK=bk,
                                                       num_warps=nw, num_stages=ns), iters=20)
                except Exception:  # noqa: BLE001 - a tile that does not fit (shared memory etc.) is skipped
                    continue
                if best is None or t < best[0]:
                    best = (t, dict(BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns))
            print(json.dumps({"kind": "sweep", "m": m, "best_us": round(best[0], 1), "best": best[1], **env}),
                  flush=True)


if __name__ == "__main__":
    main()
