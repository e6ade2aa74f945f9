"""Measure the natix engine on one GPU, in one run; write JSONL (one line per measurement).

    python scripts/bench_engine.py --out out.jsonl [--sections host,engine,qserve,maj] [--schemes dense,w4a8kv4]

Sections:
- ``host``: host (CPU) cost per call of each op outside graphs, the old op path beside the lean
  launchers the engine uses (a loop of launches without syncs: the time per iteration is what the
  host spends, as long as it is longer than the GPU's share).
- ``engine``: Llama-3-8B shape, random weights (round-to-nearest quantized for w4a8kv4 / fp8),
  ``B`` prompts of ``--prompt-len`` random tokens, ``--gen`` new tokens each, greedy; decode tok/s,
  ms per decode step, TTFT and inter-token latency percentiles, end-to-end output tok/s.
- ``qserve``: 1024 in / 512 out, as many concurrent sequences as an equal KV budget holds
  (``--kv-gb``), per scheme: throughput and the batch reached.
- ``maj``: one 512-token prompt, 256 new tokens, maj@8 (n=8, T=0.7) vs greedy: latency ratio and
  the KV pages used against one prompt + 8 x generated.
- ``coldstart``: an engine as natix-serve makes it (``--warmup``, async scheduling on): load time
  (random weights + warm-up), then the first requests of new shapes (1 x 1024, 8 x 128, 32 x 512
  tokens) and the same again; run it first in a fresh process with a fresh TRITON_CACHE_DIR to see
  what a first start costs.
``engine``, ``qserve`` and ``profile`` run each scheme with async scheduling off and on (``--async``).
Every line carries the environment (card, driver, versions, git SHA, command, copy bandwidth).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC: Any = None  # the model shape (Llama-3-8B unless --tiny)


def sh(cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def copy_gbps() -> float | None:
    if DEV.type != "cuda":
        return None
    x = torch.empty(1 << 29, dtype=torch.int16, device=DEV)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del x, y
    return round(2 * (1 << 30) / statistics.median(ts) / 1e9, 1)


def environment() -> dict[str, Any]:
    import triton

    return {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else None, "device": str(DEV), "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "git_sha": os.environ.get("GIT_SHA") or sh("git rev-parse HEAD"),
            "command": " ".join(["python3"] + sys.argv), "run": os.environ.get("NATIX_BENCH_RUN"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


class Out:
    def __init__(self, path: str, env: dict[str, Any]) -> None:
        self.f = open(path, "a")
        self.env = env

    def __call__(self, **rec: Any) -> None:
        rec["env"] = self.env
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        print(json.dumps({k: v for k, v in rec.items() if k != "env"}), flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------ host cost
def host_us(fn: Callable[[], Any], n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def gpu_us(fn: Callable[[], Any], n: int = 50) -> float:
    g = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def section_host(out: Out) -> None:
    from natix.kernels.activation import silu_mul_triton
    from natix.kernels.fused_norm import add_rmsnorm_triton
    from natix.kernels.kv4_cache import KV4Cache, kv4_write, kv4_write_triton
    from natix.kernels.kv4_decode_attention import kv4_decode_attention, kv4_decode_attention_triton
    from natix.kernels.packing import quantize_channel, quantize_progressive
    from natix.kernels.rmsnorm_quant import quantize_per_token, rmsnorm_quant, rmsnorm_quant_triton
    from natix.kernels.rope import cos_sin_table, rope_triton
    from natix.kernels.w4a8_gemm import w4a8_gemm
    from natix.kernels.w4a8_launch import W4A8Gemm
    from natix.quant.w4a8 import W4A8Linear

    w = quantize_channel(torch.randn(4096, 4096, device=DEV) * 0.02)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    xq, xs, xsum = quantize_per_token(x)
    norm_w = torch.ones(4096, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    lin = W4A8Linear.from_packed(w).to(DEV)
    gemm = W4A8Gemm(w)
    wg = quantize_progressive(torch.randn(4096, 4096, device=DEV) * 0.02)
    gemm_g = W4A8Gemm(wg)
    wb = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
    gu = torch.randn(1, 2 * 14336, device=DEV, dtype=torch.bfloat16)
    qkv = torch.randn(1, 6144, device=DEV, dtype=torch.bfloat16)
    q, k = qkv[:, :4096].view(1, 32, 128), qkv[:, 4096:5120].view(1, 8, 128)
    pos = torch.zeros(1, dtype=torch.int32, device=DEV)
    table = cos_sin_table(torch.rand(64, device=DEV), 4096)
    cache = KV4Cache.empty(64, 8, 64, 128, DEV)
    bt = torch.arange(1, 5, dtype=torch.int32, device=DEV).view(1, 4)
    lens = torch.tensor([256], dtype=torch.int32, device=DEV)
    slots = torch.tensor([64], dtype=torch.int32, device=DEV)
    kk = torch.randn(1, 8, 128, device=DEV, dtype=torch.bfloat16)
    cases = {
        "F.linear bf16 4096x4096 (cuBLAS)": lambda: torch.nn.functional.linear(x, wb),
        "W4A8Linear module (hf engine path: quant op + gemm op)": lambda: lin(x),
        "natix::w4a8_gemm op": lambda: w4a8_gemm(xq, xs, w, xsum),
        "W4A8Gemm prepared launcher": lambda: gemm(xq, xs, xsum),
        "W4A8Gemm prepared launcher, g128": lambda: gemm_g(xq, xs),
        "natix::rmsnorm_quant op": lambda: rmsnorm_quant(h, norm_w),
        "rmsnorm_quant_triton direct": lambda: rmsnorm_quant_triton(h, None, 0.0),
        "add_rmsnorm_triton quant (engine)": lambda: add_rmsnorm_triton(h, x, norm_w, 1e-5, True, check=False),
        "silu_mul_triton quant (engine)": lambda: silu_mul_triton(gu, True, check=False),
        "rope_triton (engine)": lambda: rope_triton(q, k, pos, table, check=False),
        "natix::kv4_write op": lambda: kv4_write(cache, kk, kk, slots),
        "kv4_write_triton direct (engine)": lambda: kv4_write_triton(cache, kk, kk, slots),
        "natix::kv4_decode_attention op": lambda: kv4_decode_attention(q, cache, bt, lens, max_len=4096),
        "kv4_decode_attention_triton direct (engine)": lambda: kv4_decode_attention_triton(q, cache, bt, lens, 0.088,
                                                                                              max_len=4096),
    }
    from natix.kernels.launch import Launcher

    @__import__("functools").lru_cache(maxsize=None)
    def empty_kernel():
        import triton

        @triton.jit
        def nop(x_ptr, n):
            pass

        return nop

    nop = Launcher(empty_kernel())
    e = torch.empty(4, device=DEV)
    cases["empty Triton kernel, natix Launcher (the floor of a direct launch)"] = lambda: nop((1,), e, 4)
    cases["empty Triton kernel, JIT launch"] = lambda: empty_kernel()[(1,)](e, 4)
    cases["torch.empty(4) on CUDA"] = lambda: torch.empty(4, device=DEV)
    for name, fn in cases.items():
        try:
            out(kind="host_cost", op=name, host_us=round(host_us(fn), 2), gpu_us=round(gpu_us(fn), 2))
        except Exception as e:  # noqa: BLE001
            out(kind="host_cost", op=name, error=f"{type(e).__name__}: {e}")
    # warps of the one-program-per-row kernels at M = 1 (they are latency-bound there)
    from natix.kernels.activation import _kernel as silu_k
    from natix.kernels.fused_norm import _kernel as norm_k

    q8 = torch.empty(1, 14336, dtype=torch.int8, device=DEV)
    f1 = torch.empty(1, device=DEV)
    i1 = torch.empty(1, dtype=torch.int32, device=DEV)
    hh = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    q4 = torch.empty(1, 4096, dtype=torch.int8, device=DEV)
    for w in (4, 8, 16, 32):
        try:
            us = gpu_us(lambda: silu_k()[(1,)](gu, q8, q8, f1, i1, 14336, gu.stride(0), q8.stride(0), QUANT=True,
                                                BLOCK=16384, num_warps=w))
            out(kind="warps", op="silu_mul quant M=1 I=14336", num_warps=w, gpu_us=round(us, 2))
            us = gpu_us(lambda: norm_k()[(1,)](hh, x, norm_w, q4, q4, f1, i1, 4096, hh.stride(0), x.stride(0),
                                                q4.stride(0), 1e-5, HAS_DELTA=True, QUANT=True, BLOCK=4096, num_warps=w))
            out(kind="warps", op="add_rmsnorm quant M=1 H=4096", num_warps=w, gpu_us=round(us, 2))
        except Exception as e:  # noqa: BLE001
            out(kind="warps", num_warps=w, error=f"{type(e).__name__}: {e}")
    # decode attention: split count vs batch and context (what the engine's graph buckets choose from)
    from natix.kernels.paged_attention import paged_decode_attention

    for b, t in ((1, 256), (1, 1024), (1, 4096), (64, 256), (64, 1024), (64, 4096)):
        pages = b * (t // 64) + 1
        c = KV4Cache.empty(pages, 8, 64, 128, DEV)
        for tt in c.tensors():
            tt.copy_(torch.randint(0, 255, tt.shape, device=DEV).to(tt.dtype) if tt.dtype == torch.uint8
                     else torch.rand(tt.shape, device=DEV).to(tt.dtype))
        kc = torch.randn(pages, 8, 64, 128, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        btab = torch.arange(1, pages, dtype=torch.int32, device=DEV).view(b, t // 64)
        sl = torch.full((b,), t, dtype=torch.int32, device=DEV)
        qq = torch.randn(b, 32, 128, device=DEV, dtype=torch.bfloat16)
        for sp in (1, 2, 4, 8, 16, 32):
            if t // sp < 64:
                continue
            try:
                kv4 = gpu_us(lambda: kv4_decode_attention_triton(qq, c, btab, sl, 0.088, num_splits=sp))
                bf = gpu_us(lambda: paged_decode_attention(qq, kc, vc, btab, sl, 0.088, num_splits=sp, check=False))
                out(kind="decode_splits", batch=b, ctx=t, splits=sp, kv4_us=round(kv4, 2), bf16_us=round(bf, 2))
            except Exception as e:  # noqa: BLE001
                out(kind="decode_splits", batch=b, ctx=t, splits=sp, error=f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------ engine
def make_engine(scheme: str, group: int, **opts: Any) -> Any:
    """An engine on random weights; graphs are captured by each section (warm-up at load off) unless
    ``opts`` says otherwise."""
    from natix.engines.natix.engine import NatixEngine
    from natix.engines.natix.spec import EngineOptions
    from natix.engines.natix.weights import random_weights

    opts = {"warmup": "none", "async_scheduling": False, **opts}
    t = time.perf_counter()
    rotate_keys = scheme == "w4a8kv4-kvrot"
    kv_group = int(scheme.removeprefix("w4a8kv4-kvg")) if scheme.startswith("w4a8kv4-kvg") else -1
    vocab8 = {"embed_bits": 8, "lm_head_bits": 8} if scheme == "w4a8kv4-vocab8" else {}
    w = random_weights(SPEC, "w4a8kv4" if scheme.startswith("w4a8kv4") else scheme, device=DEV,
                       dtype=torch.bfloat16 if DEV.type == "cuda" else torch.float32, group_size=group, seed=0,
                       **vocab8)
    import dataclasses

    # the artifact options rotate_keys (q and k rotated by the head Hadamard in the RoPE + KV4 write)
    # and kv_group_size (KV4 channel groups)
    w = dataclasses.replace(w, rotate_keys=rotate_keys, kv_group_size=kv_group)
    sync()
    e = NatixEngine()
    e.load_weights(w, options=EngineOptions(**opts))
    e.load_s = time.perf_counter() - t
    return e


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def free(engine: Any) -> None:
    engine.close()
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def run_requests(engine: Any, prompts: list[list[int]], spec: Any) -> dict[str, Any]:
    """Submit everything at t0, step to the end; per-step and per-request timings."""
    from natix.engines.base import Completion

    sync()
    t0 = time.perf_counter()
    ids = [engine.add_request(p, spec) for p in prompts]
    steps: list[tuple[bool, int, float]] = []
    done: dict[tuple[str, int], Completion] = {}
    max_running = 0
    min_free = engine.scheduler.blocks.num_free
    while engine.has_unfinished():
        ts = time.perf_counter()
        deltas = engine.step()
        te = time.perf_counter()
        if engine.last_step:
            steps.append((engine.last_step["prefill"], engine.last_step["seqs"], te - ts))
        for d in deltas:
            if d.completion is not None:
                done[(d.request_id, d.index)] = d.completion
        max_running = max(max_running, len(engine.scheduler.running))
        min_free = min(min_free, engine.scheduler.blocks.num_free)
    total = time.perf_counter() - t0
    comps = [done[(r, j)] for r in ids for j in range(spec.n)]
    dec = [(n, dt) for p, n, dt in steps if not p]
    pre = [dt for p, _, dt in steps if p]
    dec_tokens = sum(n for n, _ in dec)
    dec_time = sum(dt for _, dt in dec)
    gen = sum(c.num_tokens for c in comps)
    ttft = [c.timing.ttft_s for c in comps]
    itl = [c.timing.decode_s_per_token for c in comps if c.num_tokens > 1]
    step_ms = [dt * 1e3 for _, dt in dec]
    return {"requests": len(prompts), "n": spec.n, "generated_tokens": gen, "wall_s": round(total, 4),
            "output_tok_per_s": round(gen / total, 1), "decode_tok_per_s": round(dec_tokens / dec_time, 1) if dec_time else None,
            "decode_steps": len(dec), "prefill_steps": len(pre), "prefill_s": round(sum(pre), 4),
            "decode_step_ms_p50": round(pct(step_ms, 50), 3) if step_ms else None,
            "decode_step_ms_p99": round(pct(step_ms, 99), 3) if step_ms else None,
            "ttft_ms_p50": round(1e3 * pct(ttft, 50), 2), "ttft_ms_p99": round(1e3 * pct(ttft, 99), 2),
            "itl_ms_p50": round(1e3 * pct(itl, 50), 3) if itl else None,
            "itl_ms_p99": round(1e3 * pct(itl, 99), 3) if itl else None,
            "max_running": max_running, "min_free_pages": min_free,
            "preemptions": engine.scheduler.preemptions}


def prompts_of(b: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(vocab) for _ in range(length)] for _ in range(b)]


def set_async(e: Any, on: bool) -> None:
    import dataclasses

    e.options = dataclasses.replace(e.options, async_scheduling=on)


def label(scheme: str, group: int) -> str:
    if scheme.startswith("w4a8kv4-kvg"):  # per-channel weights, KV4 channel groups
        return "w4a8kv4-chan-" + scheme.removeprefix("w4a8kv4-")
    return {"dense": "bf16", "fp8": "fp8", "w4a8kv4-kvrot": "w4a8kv4-chan-kvrot",
            "w4a8kv4-vocab8": "w4a8kv4-chan-vocab8"}.get(
        scheme, f"w4a8kv4-{f'g{group}' if group > 0 else 'chan'}")


def section_engine(out: Out, a: argparse.Namespace) -> None:
    from natix.engines.base import SamplingSpec

    for scheme, group in a.scheme_list:
        e = None
        try:
            e = make_engine(scheme, group, max_num_seqs=max(a.batches), max_model_len=max(1088, a.prompt_len + a.gen + 64),
                            max_num_batched_tokens=max(8192, max(a.batches) * a.prompt_len), kv_cache_memory_gb=a.kv_gb)
            t = time.perf_counter()
            e.runner.warmup(a.batches, contexts=[a.prompt_len + a.gen])
            warm = time.perf_counter() - t
            for b, asy in ((b, asy) for b in a.batches for asy in a.async_list):
                set_async(e, asy)
                spec = SamplingSpec(max_tokens=a.gen)
                vocab = e.runner.spec.vocab
                # warm the prefill path at this shape; every run then has fresh prompts (no prefix-cache hits)
                run_requests(e, prompts_of(b, a.prompt_len, vocab, seed=10**6 + b), spec.replace(max_tokens=2))
                for rep in range(a.reps):
                    r = run_requests(e, prompts_of(b, a.prompt_len, vocab, seed=1000 * b + rep + 17 * asy), spec)
                    out(kind="engine", scheme=label(scheme, group), batch=b, prompt_len=a.prompt_len, gen=a.gen, rep=rep,
                        async_scheduling=asy, steps_ahead=e.steps_ahead,
                        graphs=e.runner.use_graphs, load_s=round(e.load_s, 2), graph_warmup_s=round(warm, 2),
                        weight_gb=round(e.runner.weight_bytes / 2**30, 3), kv_gb=round(e.runner.kv.nbytes / 2**30, 3),
                        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV.type == "cuda" else None,
                        **r)
            # prefix caching: the same 1024-token prompt twice; the second prefill computes its last page only
            p = prompts_of(1, 1024, vocab, seed=5)
            cold = run_requests(e, p, SamplingSpec(max_tokens=2))
            warm = run_requests(e, p, SamplingSpec(max_tokens=2))
            out(kind="prefix_cache", scheme=label(scheme, group), prompt_len=1024, ttft_ms_cold=cold["ttft_ms_p50"],
                ttft_ms_warm=warm["ttft_ms_p50"], hit_tokens=e.scheduler.blocks.cache_hit_tokens)
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            out(kind="engine", scheme=label(scheme, group), error=f"{type(ex).__name__}: {ex}")
        finally:
            if e is not None:
                free(e)


def section_qserve(out: Out, a: argparse.Namespace) -> None:
    from natix.engines.base import SamplingSpec

    for scheme, group in a.scheme_list:
        e = None
        try:
            e = make_engine(scheme, group, max_num_seqs=a.qserve_max_seqs, max_model_len=1024 + a.qserve_gen + 64,
                            max_num_batched_tokens=16384, kv_cache_memory_gb=a.kv_gb)
            cap = e.runner.kv.capacity_tokens
            per_seq = -(-(1024 + a.qserve_gen) // e.runner.page_size) * e.runner.page_size
            b = max(1, min(a.qserve_max_seqs, cap // per_seq))
            prompts = prompts_of(b, 1024, e.runner.spec.vocab, seed=7)
            run_requests(e, prompts[:2], SamplingSpec(max_tokens=4))
            e.runner.warmup([b], contexts=[1024 + a.qserve_gen])
            for asy in a.async_list:
                set_async(e, asy)
                r = run_requests(e, prompts_of(b, 1024, e.runner.spec.vocab, seed=7 + asy), SamplingSpec(max_tokens=a.qserve_gen))
                out(kind="qserve", scheme=label(scheme, group), prompt_len=1024, gen=a.qserve_gen, async_scheduling=asy,
                    kv_cache_gb=round(e.runner.kv.nbytes / 2**30, 3), kv_capacity_tokens=cap, concurrency_target=b, **r)
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            out(kind="qserve", scheme=label(scheme, group), error=f"{type(ex).__name__}: {ex}")
        finally:
            if e is not None:
                free(e)


def section_maj(out: Out, a: argparse.Namespace) -> None:
    from natix.engines.base import SamplingSpec

    for scheme, group in a.scheme_list:
        e = None
        try:
            e = make_engine(scheme, group, max_num_seqs=16, max_model_len=512 + 256 + 64, kv_cache_memory_gb=a.kv_gb)
            e.runner.warmup([1, 8], modes=("greedy", "sample"), contexts=[768])
            prompt = prompts_of(1, 512, e.runner.spec.vocab, seed=3)
            run_requests(e, prompt, SamplingSpec(max_tokens=4))
            ps = e.runner.page_size
            greedy = run_requests(e, prompt, SamplingSpec(max_tokens=256))
            before = e.scheduler.blocks.num_free
            maj = run_requests(e, prompt, SamplingSpec(n=8, temperature=0.7, max_tokens=256, seed=1))
            used = before - maj["min_free_pages"]
            bound = -(-512 // ps) + 8 * -(-256 // ps)
            out(kind="maj8", scheme=label(scheme, group), prompt_len=512, gen=256, greedy=greedy, maj8=maj,
                latency_ratio=round(maj["wall_s"] / greedy["wall_s"], 3), kv_pages_used=used,
                kv_pages_bound_prompt_plus_8x_gen=bound, page_size=ps)
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            out(kind="maj8", scheme=label(scheme, group), error=f"{type(ex).__name__}: {ex}")
        finally:
            if e is not None:
                free(e)


def section_profile(out: Out, a: argparse.Namespace) -> None:
    """Where a decode step's time goes: GPU kernel time by kernel (torch.profiler over graph replays),
    the step's wall time, and the gap between them (host work the GPU waits for)."""
    from natix.engines.base import SamplingSpec

    for scheme, group in a.scheme_list:
        e = None
        try:
            e = make_engine(scheme, group, max_num_seqs=max(a.batches), max_model_len=a.prompt_len + a.gen + 64,
                            max_num_batched_tokens=max(8192, max(a.batches) * a.prompt_len), kv_cache_memory_gb=a.kv_gb)
            for b, asy in ((b, asy) for b in a.batches for asy in a.async_list):
                set_async(e, asy)
                e.runner.warmup([b], contexts=[a.prompt_len + 40])
                prompts = prompts_of(b, a.prompt_len, e.runner.spec.vocab, seed=b)
                for p in prompts:
                    e.add_request(p, SamplingSpec(max_tokens=40))
                e.step()  # prefill
                for _ in range(5):
                    e.step()
                sync()
                walls = []
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        t = time.perf_counter()
                        e.step()
                        walls.append(time.perf_counter() - t)
                    sync()
                while e.has_unfinished():
                    e.step()
                kern: dict[str, list[float]] = {}
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        kern.setdefault(ev.name, []).append(ev.device_time_total if hasattr(ev, "device_time_total")
                                                            else ev.cuda_time_total)
                total = sum(sum(v) for v in kern.values()) / 20
                top = sorted(((k, sum(v) / 20, len(v) / 20) for k, v in kern.items()), key=lambda x: -x[1])[:20]
                out(kind="profile", scheme=label(scheme, group), batch=b, async_scheduling=asy, step_wall_ms=round(1e3 * statistics.median(walls), 3),
                    gpu_us_per_step=round(total, 1), kernels_per_step=round(sum(len(v) for v in kern.values()) / 20, 1),
                    top=[{"kernel": k[:80], "us_per_step": round(us, 1), "calls_per_step": c} for k, us, c in top])
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            out(kind="profile", scheme=label(scheme, group), error=f"{type(ex).__name__}: {ex}")
        finally:
            if e is not None:
                free(e)


def section_coldstart(out: Out, a: argparse.Namespace) -> None:
    from natix.engines.base import SamplingSpec

    for scheme, group in a.scheme_list:
        e = None
        try:
            before = torch.cuda.memory_reserved() if DEV.type == "cuda" else 0
            e = make_engine(scheme, group, max_model_len=4096, kv_cache_memory_gb=a.kv_gb, warmup=a.warmup,
                            async_scheduling=True)
            info = e.info()
            rec: dict[str, Any] = {}
            vocab = e.runner.spec.vocab
            for again in (False, True):
                for name, b, plen in (("1x1024", 1, 1024), ("8x128", 8, 128), ("32x512", 32, 512)):
                    r = run_requests(e, prompts_of(b, plen, vocab, seed=b * 7 + plen + again), SamplingSpec(max_tokens=16))
                    rec[name + ("_again" if again else "_first")] = {k: r[k] for k in ("wall_s", "ttft_ms_p50", "ttft_ms_p99",
                                                                                         "itl_ms_p50", "decode_step_ms_p99")}
            out(kind="coldstart", scheme=label(scheme, group), warmup=a.warmup, load_s=round(e.load_s, 2),
                warmup_info=info.get("warmup"), graphs_at_load=len(info["graphs_captured"]),
                graph_capture_s=info["graph_capture_s"], triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"),
                weight_gb=round(e.runner.weight_bytes / 2**30, 3), kv_gb=round(e.runner.kv.nbytes / 2**30, 3),
                reserved_gb_after_load=round(((torch.cuda.memory_reserved() if DEV.type == "cuda" else 0) - before) / 2**30, 2),
                **rec)
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc()
            out(kind="coldstart", scheme=label(scheme, group), warmup=a.warmup, error=f"{type(ex).__name__}: {ex}")
        finally:
            if e is not None:
                free(e)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sections", default="host,engine,qserve,maj")
    p.add_argument("--schemes", default="dense,w4a8kv4", help="dense, fp8, w4a8kv4 (per channel), w4a8kv4-g128 (or -g64, -g32), w4a8kv4-kvrot (per channel, rotate_keys), w4a8kv4-kvg32 (per channel, KV4 groups of 32 channels), w4a8kv4-vocab8 (per channel, 8-bit embedding and lm_head)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--kv-gb", type=float, default=24.0, help="KV cache memory per engine (equal for every scheme)")
    p.add_argument("--qserve-gen", type=int, default=512)
    p.add_argument("--qserve-max-seqs", type=int, default=512)
    p.add_argument("--async", dest="async_modes", default="off,on", help="async scheduling in engine/qserve/profile: off,on")
    p.add_argument("--warmup", default="greedy,sample", help="the coldstart section's engine option warmup")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (a dry run of the script, e.g. on CPU)")
    a = p.parse_args()
    global SPEC
    from natix.engines.natix.spec import ModelSpec
    from natix.engines.natix.weights import LLAMA3_8B

    SPEC = LLAMA3_8B if not a.tiny else ModelSpec(arch="llama", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                                                   intermediate=512, vocab=1000, rms_eps=1e-5, max_positions=4096)
    a.batches = [int(x) for x in a.batches.split(",")]
    a.async_list = [{"off": False, "on": True}[x] for x in a.async_modes.split(",")]
    a.scheme_list = []
    for s in a.schemes.split(","):
        g = s.removeprefix("w4a8kv4-g")  # w4a8kv4-g128, -g64, -g32: progressive groups
        a.scheme_list.append(("w4a8kv4", int(g)) if g != s and g.isdigit() else (s, -1))
    torch.manual_seed(0)
    env = environment()
    env["copy_gbps"] = copy_gbps()
    out = Out(a.out, env)
    print(json.dumps(env), flush=True)
    for s in a.sections.split(","):
        t = time.perf_counter()
        {"host": lambda: section_host(out), "engine": lambda: section_engine(out, a),
         "qserve": lambda: section_qserve(out, a), "maj": lambda: section_maj(out, a),
         "profile": lambda: section_profile(out, a), "coldstart": lambda: section_coldstart(out, a)}[s]()
        print(f"== section {s}: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
