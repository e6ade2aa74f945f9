"""Check and time every natix kernel, shape and baseline on one GPU, in one run; write JSONL.

    python scripts/bench_kernels.py --out reports/kernels.jsonl [--tune] [--sections gemm,kv4,rope,norm,gemlite]

Each line is one measurement: {"kind": ..., shape fields, "impl": ..., "us": median, "rel_err": ...,
"env": {...}}. Timing: triton.testing.do_bench (median) over a CUDA graph that replays R calls on R
rotated input/weight sets (so neither launch gaps nor L2 hits flatter small shapes); us = per call.
Correctness is checked in the same run against each kernel's reference. `--tune` times a candidate
list of W4A8 configurations per (variant, N, K, M) and writes kernels/configs/w4a8_gemm.json-style
JSON (to --tuned-out) which the timed runs then use.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

from natix.kernels import packing
from natix.kernels import w4a8_gemm as g
from natix.kernels.fp8_linear import quantize_fp8_per_token, quantize_fp8_weight
from natix.kernels.kv4_cache import KV4Cache, kv4_write
from natix.kernels.kv4_decode_attention import kv4_decode_attention_reference, kv4_decode_attention_triton
from natix.kernels.rmsnorm_quant import quantize_per_token, rmsnorm_quant_reference, rmsnorm_quant_triton
from natix.kernels.w4a8_launch import W4A8Gemm

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 1024, 4096]
DEV = torch.device("cuda")
L2_FLUSH_BYTES = 200 << 20
DEADLINE = [float("inf")]  # rotate sets until this many bytes are touched per replay


def env() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return None

    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "git_sha": os.environ.get("GIT_SHA") or sh("git rev-parse HEAD"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "sms": torch.cuda.get_device_properties(DEV).multi_processor_count,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # one label for all bench processes of one device call (the renderer groups records by it)
        "run": os.environ.get("NATIX_BENCH_RUN"),
    }


class Out:
    def __init__(self, path: str, envd: dict):
        self.f = open(path, "a")
        self.env = envd

    def __call__(self, **rec):
        rec["env"] = self.env
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        short = {k: v for k, v in rec.items() if k != "env"}
        print(json.dumps(short), flush=True)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_graph(fns, use_graph=True, rep=100, warmup=25) -> float:
    """fns: list of R zero-arg callables (one per rotated set). Returns median us per call."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for f in fns:
                    f()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for f in fns:
                    f()
            ms = do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
            return ms * 1000 / len(fns)
        except Exception as e:  # noqa: BLE001
            print("graph capture failed, timing eagerly:", repr(e)[:200], flush=True)
            torch.cuda.synchronize()
    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1

    return do_bench(step, warmup=25, rep=rep, return_mode="median") * 1000


def copies(nbytes: int, cap: int = 8) -> int:
    return max(1, min(cap, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


# ------------------------------------------------------------------------------------------------
def measure_copy(out: Out) -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    bw = 2 * n / ms / 1e6
    out(kind="copy", impl="torch copy_ 1GiB", us=ms * 1000, gbps=bw)
    del a, b
    return bw


def candidates(m: int, grouped: bool = True) -> list[dict]:
    """W4A8 configurations to time per (variant, N, K, M bucket). Small M: many split-K programs so
    that enough weight bytes are in flight; BK=256 only for per-channel (g128 needs BK | 128)."""
    c = []
    if m <= 16:
        for bnh in (32, 64):  # BNH=128 at 4 warps spills (sm_90 compile report)
            for split in (1, 2, 4, 8, 16):
                c.append(dict(BM=16, BNH=bnh, BK=128, SPLIT_K=split, num_warps=4, num_stages=4))
        for split in (4, 8):
            c.append(dict(BM=16, BNH=64, BK=128, SPLIT_K=split, num_warps=4, num_stages=6))
            c.append(dict(BM=16, BNH=32, BK=64 if grouped else 256, SPLIT_K=split, num_warps=4, num_stages=5))
        if not grouped:
            for split in (2, 4, 8):
                c.append(dict(BM=16, BNH=64, BK=256, SPLIT_K=split, num_warps=4, num_stages=3))
    elif m <= 64:
        for bm in (16, 32, 64):
            for bnh in (32, 64):
                for split in (1, 2, 4, 8):
                    if bm == 16 and split == 1:
                        continue
                    c.append(dict(BM=bm, BNH=bnh, BK=128, SPLIT_K=split, num_warps=4, num_stages=4))
    else:
        for bm, bnh in ((64, 128), (128, 64), (128, 128), (256, 64)):
            for w in (4, 8):
                c.append(dict(BM=bm, BNH=bnh, BK=128, SPLIT_K=1, num_warps=w, num_stages=3, GROUP_M=8))
        for bm, bnh, w in ((64, 64, 4), (256, 128, 8)):
            c.append(dict(BM=bm, BNH=bnh, BK=128, SPLIT_K=1, num_warps=w, num_stages=3, GROUP_M=8))
        for bm, bnh, w in ((128, 64, 4), (128, 64, 8), (256, 64, 8), (128, 128, 8)):
            c.append(dict(BM=bm, BNH=bnh, BK=128, SPLIT_K=1, num_warps=w, num_stages=4, GROUP_M=8))
        if m <= 1024:  # too few output tiles to fill 132 SMs on the smaller shapes
            for bm, bnh in ((64, 128), (128, 64)):
                for split in (2, 4):
                    c.append(dict(BM=bm, BNH=bnh, BK=128, SPLIT_K=split, num_warps=4, num_stages=3, GROUP_M=8))
    return c


def plain(cfg: dict) -> dict:
    """A prepared GEMM's config without its launcher and argument tensors (for the JSONL)."""
    return {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}


def make_gemm_inputs(m, n, k, group, r):
    """``r`` rotated input sets; ``group``: the progressive group size, 0 for per channel."""
    sets = []
    for _ in range(r):
        w = torch.randn(n, k, device=DEV)
        pw = packing.quantize_progressive(w, group) if group else packing.quantize_channel(w)
        del w
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        xq, xs, xsum = quantize_per_token(x)
        sets.append((x, xq, xs, xsum, pw))
    return sets


def tune(out: Out, tuned_path: str, shapes, ms, variants, deadline: float = float("inf")) -> None:
    """Time every candidate the way the bench times the kernel: CUDA-graph replays over rotated
    weight/input sets (so launch overhead and L2 hits do not rank µs-scale configs). Buckets not in
    ``ms`` (or not reached before ``deadline``) keep the entries of the shipped table."""
    key = g.device_key(DEV)
    table = json.loads(json.dumps(g._load_configs()))
    table.setdefault(key, {})
    # M outermost: the buckets the goals are about (small M) are tuned first if the deadline cuts in
    for m in ms:
        for vname in variants:  # g128, channel, w8 (g128 weights expanded to INT8, the expansion timed too)
            grouped, w8 = vname != "channel", vname == "w8"
            table[key].setdefault(vname, {})
            for n, k in shapes:
                ent = table[key][vname].setdefault(f"{n},{k}", {})
                if time.time() > deadline:
                    out(kind="tune", variant=vname, n=n, k=k, m=m, error="skipped: tuning deadline")
                    continue
                r = copies(n * k // 2)
                wsets = make_gemm_inputs(1, n, k, 128 if grouped else 0, r)
                xsets = [quantize_per_token(torch.randn(m, k, device=DEV, dtype=torch.bfloat16)) for _ in range(r)]
                best, tried = None, []
                for cfg in candidates(m, grouped and not w8):
                    try:  # through the prepared GEMM the engine runs (packed level 1, block sums on tensor cores)
                        gemms = [W4A8Gemm(s[4], gemv=False, config=cfg, expand_m=1 if w8 else 0) for s in wsets]
                        fns = [lambda q=q, f=f: f(q[0], q[1], q[2]) for q, f in zip(xsets, gemms)]
                        us = bench_graph(fns, rep=20, warmup=5)
                    except Exception as e:  # noqa: BLE001
                        print("cfg failed", cfg, repr(e)[:200], flush=True)
                        continue
                    tried.append((round(us, 2), cfg))
                    if best is None or us < best[0]:
                        best = (us, cfg)
                ent[str(m)] = best[1]
                out(kind="tune", variant=vname, n=n, k=k, m=m, us=best[0], config=best[1], timing="cuda-graph, rotated",
                    tried=tried)
                del xsets, wsets
                torch.cuda.empty_cache()
    with open(tuned_path, "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
    g._CONFIG_FILE = __import__("pathlib").Path(tuned_path)
    g._load_configs.cache_clear()


def bench_gemm(out: Out, shapes, ms, groups=(128, 0)) -> None:
    for n, k in shapes:
        for m in ms:
            rec = dict(kind="gemm", n=n, k=k, m=m)
            wb = n * k * 2
            r = copies(wb // 4 + m * k)
            # --- ours: the progressive group sizes asked for and per channel; gemm only and quant + gemm
            for group in groups:
                grouped = group > 0
                vname = f"w4a8_g{group}" if grouped else "w4a8_channel"
                sets = make_gemm_inputs(m, n, k, group, r)
                x, xq, xs, xsum, pw = sets[0]
                # the prepared GEMM the engine runs (and its GEMV at M = 1 where the table has one)
                gemms = [W4A8Gemm(s[4]) for s in sets]
                y = gemms[0](xq, xs, xsum)
                yi = W4A8Gemm(pw, out_dtype=torch.int32)(xq, xs, xsum)
                ref = (xq.float() * xs[:, None]) @ packing.dequantize(pw).t()
                exact = bool(torch.equal(yi, (xq.double() @ packing.integer_weight(pw).double().t()).to(torch.int32))) if m * n * k <= 2**36 else None
                err = rel(y, ref)
                gemv = m == 1 and gemms[0].gemv
                cfg = gemms[0]._gemv_cfg if gemv else gemms[0]._config(m, gemms[0].expands(m))
                fns = [lambda s=s, f=f: f(s[1], s[2], s[3]) for s, f in zip(sets, gemms)]
                path = "gemv" if gemv else "expand+gemm" if gemms[0].expands(m) else "gemm"
                out(**rec, impl=vname, us=bench_graph(fns), rel_err=err, int_exact=exact, path=path, config=plain(cfg))
                if grouped and m >= 256:  # the other side of the INT8 expansion threshold (`natix.kernels.w4a8_expand`)
                    other = 0 if gemms[0].expands(m) else 1
                    alt = [W4A8Gemm(s[4], expand_m=other) for s in sets]
                    ai = W4A8Gemm(pw, out_dtype=torch.int32, expand_m=other)(xq, xs, xsum)
                    fns = [lambda s=s, f=f: f(s[1], s[2], s[3]) for s, f in zip(sets, alt)]
                    out(**rec, impl=vname + ("-inloop" if other == 0 else "-expand"), us=bench_graph(fns),
                        rel_err=rel(alt[0](xq, xs, xsum), ref), int_exact=bool(torch.equal(ai, yi)),
                        path="gemm" if other == 0 else "expand+gemm", config=plain(alt[0]._config(m, other == 1)))
                    del alt, ai
                fns = [lambda s=s, f=f: (lambda q: f(q[0], q[1], q[2]))(quantize_per_token(s[0])) for s, f in zip(sets, gemms)]
                out(**rec, impl=vname + "+quant", us=bench_graph(fns))
                del sets, x, xq, xs, xsum, pw, y, yi, ref, fns, gemms
                torch.cuda.empty_cache()
            # --- baselines
            rb = copies(wb + m * k * 2)
            ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) for _ in range(rb)]
            xs_ = [torch.randn(m, k, device=DEV, dtype=torch.bfloat16) for _ in range(rb)]
            out(**rec, impl="bf16 cublas", us=bench_graph([lambda a=a, b=b: a @ b.t() for a, b in zip(xs_, ws)]))
            f8 = [quantize_fp8_weight(w) for w in ws]
            q8 = [quantize_fp8_per_token(a) for a in xs_]
            try:
                out(**rec, impl="fp8 _scaled_mm", us=bench_graph([
                    lambda q=q, w=w: torch._scaled_mm(q[0], w.weight.t(), scale_a=q[1], scale_b=w.weight_scale.view(1, -1), out_dtype=torch.bfloat16)
                    for q, w in zip(q8, f8)]))
            except Exception as e:  # noqa: BLE001
                out(**rec, impl="fp8 _scaled_mm", error=repr(e)[:300])
            del f8, q8
            wi = [torch.randint(-127, 127, (n, k), device=DEV, dtype=torch.int8) for _ in range(copies(n * k))]
            mi = max(m, 17)  # _int_mm needs M > 16
            xi = [torch.randint(-127, 127, (mi, k), device=DEV, dtype=torch.int8) for _ in range(len(wi))]
            try:
                out(**rec, impl="int8 _int_mm", us=bench_graph([lambda a=a, b=b: torch._int_mm(a, b.t()) for a, b in zip(xi, wi)]),
                    note=None if mi == m else f"M padded to {mi} (_int_mm needs M>16)")
            except Exception as e:  # noqa: BLE001
                out(**rec, impl="int8 _int_mm", error=repr(e)[:300])
            del ws, xs_, wi, xi
            torch.cuda.empty_cache()


LEVEL1_FLAGS = {  # name: (NATIX_W4A8_META, NATIX_W4A8_XSUM_DOT, NATIX_W4A8_BYTES)
    "words, bytes+reduce": ("0", "0", "0"), "words, packed+dot": ("1", "1", "0"), "bytes, packed+dot": ("1", "1", "1")}
CHANNEL_FLAGS = {"words": "0", "bytes": "1"}


def bench_level1(out: Out, shapes, ms=(1, 16, 64, 256), group: int = 128) -> None:
    """A/B of the prepared GEMM's unpacking and level-1 reads, same inputs for every variant, tuned
    configs, the GEMM at M = 1 too: how raw codes are unpacked (`NATIX_W4A8_BYTES`: word-wide ops then
    Triton's byte regrouping, or inline PTX on packed bytes), how progressive level 1 is read
    (`NATIX_W4A8_META`: four byte loads per row and K-block, or one packed word) and, after the dot
    (M <= 16), where each block's sum of codes comes from (`NATIX_W4A8_XSUM_DOT`: a reduction, or a dot
    with ones). Per channel beside, both unpackings."""
    names = ("NATIX_W4A8_META", "NATIX_W4A8_XSUM_DOT", "NATIX_W4A8_BYTES")
    for n, k in shapes:
        r = copies(n * k // 2)
        for m in ms:
            for grp, flags in ((group, LEVEL1_FLAGS), (0, {k_: ("1", "1", v) for k_, v in CHANNEL_FLAGS.items()})):
                sets = make_gemm_inputs(m, n, k, grp, r)
                ref = W4A8Gemm(sets[0][4], out_dtype=torch.int32, gemv=False)(sets[0][1], sets[0][2], sets[0][3])
                for name, vals in flags.items():
                    os.environ.update(dict(zip(names, vals)))
                    gemms = [W4A8Gemm(s[4], gemv=False) for s in sets]
                    exact = bool(torch.equal(W4A8Gemm(sets[0][4], out_dtype=torch.int32, gemv=False)(
                        sets[0][1], sets[0][2], sets[0][3]), ref))
                    out(kind="level1", n=n, k=k, m=m, group=grp, impl=name, exact_vs_first=exact,
                        config=plain(gemms[0]._config(m)),
                        us=bench_graph([lambda s=s, f=f: f(s[1], s[2], s[3]) for s, f in zip(sets, gemms)]))
                for v in names:
                    os.environ.pop(v, None)
                del sets, gemms
                torch.cuda.empty_cache()


GEMLITE_KINDS = ("A16W4", "A8W4-fp8")


def gemlite_bundled_entries(gemlite, m, n, k, group_size) -> list:
    """(kernel type, type id) of the entries GemLite's config cache holds for this (M bucket, N, K, group):
    in bundled-config mode, a kernel whose type id is absent is autotuned by GemLite on first use."""
    try:
        from gemlite.triton_kernels import utils as gu
        cache = gemlite.core.GEMLITE_TRITON_CONFIG_CACHE
        pre = f"({gu.get_closest_m(m)}, {n}, {k}, {group_size},"
        return sorted({f"{t}:{kk.rstrip(')').split(',')[-1].strip()}" for t, v in cache.items() for kk in v if kk.startswith(pre)})
    except Exception as e:  # noqa: BLE001
        return [repr(e)[:80]]


def bench_gemlite(out: Out, shapes, ms, modes=("bundled-config", "autotune-fast"), group_size=128, autotune_ms=None,
                  kinds=GEMLITE_KINDS, shape_ms=None) -> None:
    """shape_ms: list parallel to ``shapes`` (a shape may repeat); an entry that is not None overrides ``ms`` (and
    ``autotune_ms``) for that shape. Order: shapes as given, then M, then kind; the deadline is checked before every
    (shape, M, kind) cell."""
    try:
        import gemlite
        from gemlite.helper import A8W4_HQQ_INT_dynamic, A16W4_HQQ_INT
    except Exception as e:  # noqa: BLE001
        out(kind="gemm", impl="gemlite", error="import failed: " + repr(e)[:300])
        return
    glv = getattr(gemlite, "__version__", None)
    procs = {"A16W4": lambda: A16W4_HQQ_INT(device="cuda", dtype=torch.float16),
             "A8W4-fp8": lambda: A8W4_HQQ_INT_dynamic(device="cuda", dtype=torch.float16)}
    for mode in modes:
        if mode.startswith("autotune"):
            # drop the bundled h100.json and autotune every (M bucket, N, K); "-graph": GemLite's own
            # CUDA-graph timing of candidates (its most accurate setting); "max": its largest search space
            gemlite.reset_config()
            gemlite.set_autotune("max" if "max" in mode else "fast", use_cuda_graph="graph" in mode)
        for si, (n, k) in enumerate(shapes):
            sms = shape_ms[si] if shape_ms else None
            if sms is None:
                sms = [m for m in ms if not (mode.startswith("autotune") and autotune_ms and m not in autotune_ms)]
            if time.time() > DEADLINE[0]:
                out(kind="gemm", n=n, k=k, ms=sms, impl=f"gemlite [{mode}]", error="skipped: out of device time in this run")
                continue
            layers = {}
            wq = torch.randint(0, 16, (n, k), device=DEV, dtype=torch.uint8)
            scales = (torch.rand(n, k // group_size, device=DEV, dtype=torch.float16) * 0.01 + 0.001)
            zeros = torch.full((n, k // group_size), 8.0, device=DEV, dtype=torch.float16)
            for name in kinds:
                try:
                    layers[name] = procs[name]().from_weights(wq, scales, zeros)
                except Exception as e:  # noqa: BLE001
                    out(kind="gemm", n=n, k=k, impl=f"gemlite {name} [{mode}]", error=repr(e)[:300])
            wdeq = ((wq.float() - 8.0) * scales.float().repeat_interleave(group_size, 1))
            del wq
            for m in sms:
                for name, layer in layers.items():
                    if time.time() > DEADLINE[0]:
                        out(kind="gemm", n=n, k=k, m=m, impl=f"gemlite {name} [{mode}]", error="skipped: out of device time in this run")
                        continue
                    try:
                        pre = gemlite_bundled_entries(gemlite, m, n, k, group_size) if mode == "bundled-config" else None
                        t0 = time.time()
                        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                        y = layer(x)  # first call: GemLite autotunes here if its cache has no entry
                        torch.cuda.synchronize()
                        first_s = time.time() - t0
                        err = rel(y, x.float() @ wdeq.t())
                        r = copies(n * k // 2)
                        xs_ = [torch.randn(m, k, device=DEV, dtype=torch.float16) for _ in range(r)]
                        # weights are not rotated for GemLite (one packed copy per layer object): its
                        # small-shape numbers may include L2 hits, i.e. they flatter GemLite
                        us = bench_graph([lambda a=a: layer(a) for a in xs_])
                        out(kind="gemm", n=n, k=k, m=m, impl=f"gemlite {name} [{mode}]", us=us, rel_err=err,
                            note="weights not rotated (L2 may hold them)" if n * k // 2 < (50 << 20) else None,
                            gemlite_version=glv, first_call_s=round(first_s, 1), bundled_entries=pre)
                    except Exception as e:  # noqa: BLE001
                        out(kind="gemm", n=n, k=k, m=m, impl=f"gemlite {name} [{mode}]", error=repr(e)[:300])
            del layers, wdeq
            torch.cuda.empty_cache()


def bench_norm(out: Out, copy_bw: float) -> None:
    h = 4096
    for m in (1, 16, 256, 4096, 16384):
        r = copies(m * h * 3)
        xs_ = [torch.randn(m, h, device=DEV, dtype=torch.bfloat16) for _ in range(r)]
        w = torch.rand(h, device=DEV, dtype=torch.bfloat16) + 0.5
        q, s, sm = rmsnorm_quant_triton(xs_[0], w)
        rq, rs, _ = rmsnorm_quant_reference(xs_[0], w)
        mism = float(((q.int() - rq.int()).abs() > 0).float().mean())
        maxd = int((q.int() - rq.int()).abs().max())
        nbytes = m * h * 2 + m * h + h * 2 + m * 8
        us = bench_graph([lambda a=a: rmsnorm_quant_triton(a, w) for a in xs_])
        out(kind="rmsnorm_quant", m=m, h=h, impl="triton fused", us=us, gbps=nbytes / us / 1e3,
            frac_copy=nbytes / us / 1e3 / copy_bw, code_mismatch=mism, code_maxdiff=maxd)
        us = bench_graph([lambda a=a: rmsnorm_quant_reference(a, w) for a in xs_])
        out(kind="rmsnorm_quant", m=m, h=h, impl="torch eager reference", us=us, gbps=nbytes / us / 1e3)
        del xs_


def build_cache(lens, hkv, d, page, group_size=-1):
    b = len(lens)
    maxp = -(-max(lens) // page)
    pages = b * maxp
    bt = torch.randperm(pages, device=DEV).view(b, maxp).to(torch.int32)
    cache = KV4Cache.empty(pages, hkv, page, d, DEV, group_size)
    # fill page by page (random data, written through the kernel)
    for i, n in enumerate(lens):
        t = torch.arange(n, device=DEV)
        slots = bt[i][t // page].long() * page + t % page
        kv = torch.randn(n, hkv, d, device=DEV, dtype=torch.bfloat16)
        kv4_write(cache, kv, torch.randn_like(kv), slots)
    return cache, bt


def bench_kv4(out: Out, copy_bw: float, tune_splits: bool, group_sizes=(-1,)) -> None:
    """KV4 decode attention at the Llama-3-8B shape, for each KV4 channel group size (-1: a scale per
    head), then the SDPA baseline over a bf16 cache; and the KV4 write of one B=64 step."""
    hq, hkv, d, page = 32, 8, 128, 64
    sm_scale = d ** -0.5
    cases = [(64, 4096), (64, 16384), (1, 4096), (1, 16384), ("ragged64", 4096)]
    for bsz, ctx, gs in ((b_, c_, g_) for b_, c_ in cases for g_ in group_sizes):
        if bsz == "ragged64":
            gen = torch.Generator().manual_seed(0)
            lens = torch.randint(1, ctx + 1, (64,), generator=gen).tolist()
        else:
            lens = [ctx] * bsz
        b = len(lens)
        rec = dict(kind="kv4_decode", batch=str(bsz), ctx=ctx, hq=hq, hkv=hkv, d=d, page=page, kv_group_size=gs)
        cache, bt = build_cache(lens, hkv, d, page, gs)
        seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
        q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
        nbytes = sum(lens) * hkv * (d + 8 * cache.num_groups) + b * hq * d * 4 + bt.numel() * 4
        # correctness on a subset of rows (the reference is slow)
        sub = list(range(min(b, 4)))
        ref = kv4_decode_attention_reference(q[sub], cache, bt[sub], seq[sub], sm_scale)
        settings = [dict()]
        if tune_splits:
            # split counts that give 1-4 waves of programs on 132 SMs (b * 8 KV heads * splits)
            splits = (1, 2, 4, 8) if b >= 32 else (8, 16, 32, 64)
            settings += [dict(num_splits=s, block_t=bt_, num_stages=st, num_warps=w, swap=sw)
                         for sw in (True, False) for s in splits for bt_, w in ((64, 4), (128, 4), (64, 8), (128, 8))
                         for st in (2, 3)]
        best, tried = None, []
        for st in settings:
            try:
                o = kv4_decode_attention_triton(q, cache, bt, seq, sm_scale, max_len=max(lens), **st)
                err = rel(o[sub], ref)
                # timed like the final number: CUDA-graph replays (no host launch overhead in the ranking)
                us = bench_graph([lambda st=st: kv4_decode_attention_triton(q, cache, bt, seq, sm_scale, max_len=max(lens), **st)],
                                 rep=15, warmup=5)
            except Exception as e:  # noqa: BLE001
                print("kv4 setting failed", st, repr(e)[:200], flush=True)
                continue
            tried.append((round(us, 1), st, round(err, 5)))
            if err < 2e-2 and (best is None or us < best[0]):
                best = (us, st, err)
        if best is None:
            out(**rec, impl="kv4 triton", error="no setting ran within 2e-2 relative error")
            del cache
            torch.cuda.empty_cache()
            continue
        out(kind="kv4_tune", **{k: v for k, v in rec.items() if k != "kind"}, tried=tried)
        # the previous kernel's layout (query heads padded to 16 rows), best setting, for the record
        prev = [t for t in tried if t[1].get("swap") is False and t[2] < 2e-2]  # the default dict() is swap=True
        if prev:
            pb = min(prev, key=lambda t: t[0])
            us_p = bench_graph([lambda: kv4_decode_attention_triton(q, cache, bt, seq, sm_scale, max_len=max(lens), **pb[1])])
            out(**rec, impl="kv4 triton rows-layout", us=us_p, rel_err=pb[2], settings=pb[1], bytes=nbytes,
                gbps=nbytes / us_p / 1e3, frac_copy=nbytes / us_p / 1e3 / copy_bw)
        st = best[1]
        us = bench_graph([lambda: kv4_decode_attention_triton(q, cache, bt, seq, sm_scale, max_len=max(lens), **st)])
        out(**rec, impl="kv4 triton" + ("" if st else " (default)"), us=us, rel_err=best[2], settings=st,
            bytes=nbytes, gbps=nbytes / us / 1e3, frac_copy=nbytes / us / 1e3 / copy_bw)
        del cache
        torch.cuda.empty_cache()
        if gs != group_sizes[-1]:
            continue
        # baseline: SDPA over a bf16 cache (equal lengths only: padded to max for ragged)
        tmax = max(lens)
        kb = torch.randn(b, hkv, tmax, d, device=DEV, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        q4 = q.view(b, hq, 1, d)
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kb, vb, enable_gqa=True)  # noqa: E731
        us_b = bench_graph([f])
        nb = kb.numel() * 4
        out(**rec, impl="torch SDPA bf16 cache" + (" (padded to max len)" if bsz == "ragged64" else ""), us=us_b,
            bytes=nb, gbps=nb / us_b / 1e3)
        del kb, vb
        torch.cuda.empty_cache()
    # KV4 write of one decode step (B=64 tokens)
    for gs in group_sizes:
        cache = KV4Cache.empty(64 * 64, hkv, page, d, DEV, gs)
        kv = torch.randn(64, hkv, d, device=DEV, dtype=torch.bfloat16)
        slots = torch.arange(64, device=DEV, dtype=torch.int32) * page * 3 % (64 * 64 * page)
        us = bench_graph([lambda: kv4_write(cache, kv, kv, slots)])
        out(kind="kv4_write", batch=64, impl="triton", us=us, kv_group_size=gs)


ROPE_CASES = ((1, 32, 8, 128), (64, 32, 8, 128), (1024, 32, 8, 128))  # (tokens, Hq, Hkv, D): Llama-3-8B


def bench_rope_write(out: Out, cases=ROPE_CASES, page: int = 64) -> None:
    """RoPE + KV4 write per layer and step: the fused launch without and with the head rotation
    (w4a8kv4 rotate_keys), and the rotation's previous three steps (rope_triton, float32 q·H and k·H
    matmuls, kv4_write_triton) as the baseline the fused one replaces. Checked against
    rope_cache_write_reference on the same inputs: rel_err of q, k in place; the key codes' mismatch
    fraction (of the written ones) and largest step; the key scales' rel_err."""
    from natix.kernels.kv4_cache import kv4_write_triton
    from natix.kernels.rope import cos_sin_table, rope_triton
    from natix.kernels.rope_cache_write import rope_cache_write, rope_cache_write_reference
    from natix.quant.qoq import head_rotation

    for t, hq, hkv, d in cases:
        rec = dict(kind="rope_kv4_write", tokens=t, hq=hq, hkv=hkv, d=d, page=page)
        rot = head_rotation(d).float().to(DEV)
        table = cos_sin_table(torch.rand(d // 2, device=DEV), 4096)
        pos = torch.randint(0, 4096, (t,), device=DEV, dtype=torch.int32)
        pages = -(-t // page) * 2
        slots = torch.randperm(pages * page, device=DEV)[:t].to(torch.int32)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
        views = lambda a: (a[:, :hq * d].view(t, hq, d), a[:, hq * d:(hq + hkv) * d].view(t, hkv, d),  # noqa: E731
                           a[:, (hq + hkv) * d:].view(t, hkv, d))
        q, k, v = views(qkv)
        cache = KV4Cache.empty(pages, hkv, page, d, DEV)
        nbytes = t * (hq + 2 * hkv) * d * 2 * 2 + t * hkv * (d + 8)  # q, k read and written, v read; codes + scales
        for label, r in (("fused", None), ("fused + rotation", rot)):
            x, ref = qkv.clone(), qkv.clone()
            xc, rc = KV4Cache.empty(pages, hkv, page, d, DEV), KV4Cache.empty(pages, hkv, page, d, DEV)
            rope_cache_write(*views(x), pos, table, slots, kv4=xc, rotation=r)
            rope_cache_write_reference(*views(ref), pos, table, slots, kv4=rc, rotation=r)
            codes = [(a.int() >> sh) & 15 for a in (xc.k, rc.k) for sh in (0, 4)]  # k nibbles: lo, hi; ref lo, hi
            diff = torch.cat([(codes[0] - codes[2]).abs(), (codes[1] - codes[3]).abs()])
            us = bench_graph([lambda r=r: rope_cache_write(q, k, v, pos, table, slots, kv4=cache, rotation=r)])
            # the reference's RoPE multiplies in bf16, the kernel's in float32: an ulp there may move a code by one
            out(**rec, impl=f"triton {label} (1 launch)", us=us, rel_err=rel(x, ref),
                code_mismatch=float((diff > 0).float().sum() / (t * hkv * d)), code_maxdiff=int(diff.max()),
                scale_rel_err=rel(xc.k_scale, rc.k_scale), bytes=nbytes, gbps=nbytes / us / 1e3)

        def three_steps():
            rope_triton(q, k, pos, table, check=False)
            q.copy_((q.float() @ rot).to(q.dtype))
            k.copy_((k.float() @ rot).to(k.dtype))
            kv4_write_triton(cache, k, v, slots)

        us = bench_graph([three_steps])
        out(**rec, impl="rotation in 3 steps: rope_triton, fp32 matmuls, kv4_write_triton (previous engine path)", us=us,
            bytes=nbytes, gbps=nbytes / us / 1e3)
        del cache, qkv
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels.jsonl")
    ap.add_argument("--sections", default="gemm,norm,kv4,rope,gemlite", help="also: level1 (A/B of the level-1 reads)")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--kv-groups", default="-1", help="kv4 section: KV4 channel group sizes to time (-1: a scale per head)")
    ap.add_argument("--ms", default="", help="M values of the gemm section (default: all)")
    ap.add_argument("--groups", default="128,0", help="gemm section: progressive group sizes to time, 0 = per channel")
    ap.add_argument("--tuned-out", default="w4a8_gemm.json")
    ap.add_argument("--gemlite-modes", default="bundled-config,autotune-fast")
    ap.add_argument("--quick", action="store_true", help="two shapes, three M (smoke test)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after start to stop GemLite")
    ap.add_argument("--tune-variants", default="g128,channel",
                    help="variants to re-tune (others keep the shipped table): g128, channel, w8 (expanded g128)")
    ap.add_argument("--tune-ms", default="1,16,64,256,1024,4096", help="M buckets to re-tune (others keep the shipped table)")
    ap.add_argument("--tune-deadline", type=float, default=1e9, help="seconds after start to stop tuning")
    ap.add_argument("--gemlite-autotune-ms", default="", help="M values to run in GemLite autotune modes (all if empty)")
    ap.add_argument("--gemlite-shapes", default="",
                    help="N,K;N,K... for GemLite (default: all shapes); N,K:M,M,... gives that shape its own M list")
    ap.add_argument("--gemlite-kinds", default=",".join(GEMLITE_KINDS), help="GemLite kernels to run: A16W4,A8W4-fp8")
    a = ap.parse_args()
    DEADLINE[0] = time.time() + a.deadline
    torch.manual_seed(0)
    shapes, ms = (SHAPES[:2], [1, 64, 4096]) if a.quick else (SHAPES, MS)
    if a.ms:
        ms = [int(x) for x in a.ms.split(",")]
    out = Out(a.out, env())
    secs = a.sections.split(",")
    t0 = time.time()
    copy_bw = measure_copy(out)
    if a.tune and "gemm" in secs:
        tms = [int(x) for x in a.tune_ms.split(",") if x]
        variants = tuple(a.tune_variants.split(","))
        tune(out, a.tuned_out, shapes, [m for m in ms if m in tms], variants, t0 + a.tune_deadline)
        print(f"[tune done {time.time() - t0:.0f}s]", flush=True)
    if "norm" in secs:
        bench_norm(out, copy_bw)
        print(f"[norm done {time.time() - t0:.0f}s]", flush=True)
    if "kv4" in secs:
        bench_kv4(out, copy_bw, a.tune, tuple(int(x) for x in a.kv_groups.split(",")))
        print(f"[kv4 done {time.time() - t0:.0f}s]", flush=True)
    if "rope" in secs:
        bench_rope_write(out)
        print(f"[rope done {time.time() - t0:.0f}s]", flush=True)
    if "level1" in secs:
        bench_level1(out, shapes)
        print(f"[level1 done {time.time() - t0:.0f}s]", flush=True)
    if "gemm" in secs:
        bench_gemm(out, shapes, ms, tuple(int(x) for x in a.groups.split(",")))
        print(f"[gemm done {time.time() - t0:.0f}s]", flush=True)
    if "gemlite" in secs:
        gshapes, shape_ms = [], []
        for x in (x for x in a.gemlite_shapes.split(";") if x):
            sh, _, mlist = x.partition(":")
            gshapes.append(tuple(int(v) for v in sh.split(",")))
            shape_ms.append([int(v) for v in mlist.split(",") if v] if mlist else None)
        if not gshapes:
            gshapes, shape_ms = shapes, None
        ams = [int(x) for x in a.gemlite_autotune_ms.split(",") if x] or None
        bench_gemlite(out, gshapes, ms, a.gemlite_modes.split(","), autotune_ms=ams,
                      kinds=[x for x in a.gemlite_kinds.split(",") if x], shape_ms=shape_ms)
        print(f"[gemlite done {time.time() - t0:.0f}s]", flush=True)
    gc.collect()


if __name__ == "__main__":
    main()
