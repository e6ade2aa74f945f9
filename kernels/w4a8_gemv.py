"""W4A8 GEMV: one token (M = 1) against a packed W4A8 weight, on CUDA cores, exact in int32.

The batch-1 decode step multiplies one INT8 activation row by every weight of the model: the work
is reading the packed weights once (N x K / 2 bytes), and an MMA tile of 16 rows does 15 rows of
nothing. This kernel streams the weights as int32 words (4 K-consecutive bytes = 8 codes: rows j
and j + N/2, see `natix.kernels.packing`) and multiplies each byte's nibbles by the activation
byte of the same k on CUDA cores, accumulating elementwise in int32 registers and reducing once:

- per channel: ``acc[n] = sum_k x[k] * q4[n, k]``; the zero point is subtracted in the epilogue
  (``- z[n] * sum_k x[k]``) exactly as the GEMM does;
- progressive: within a group the level-1 scale and zero are constant, so
  ``sum_k x (q4 s1 - sz) = s1 * sum_k x q4 - sz * sum_k x`` per group: no per-element dequantization
  (the K-block is the group: ``BK == G``).

Split-K over ``SPLIT_K`` programs per column block; the last to finish (atomic ticket, as in
`natix.kernels.w4a8_gemm`) sums the int32 partials and runs the float epilogue, so one launch.
Same inputs, outputs and numbers as the GEMM (`w4a8_gemm_reference` is the reference of both).
`natix.kernels.w4a8_launch.W4A8Gemm` runs it for one row where :func:`gemv_config` has a measured win.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .packing import W4A8Weight


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w4a8_gemv_kernel(
        x_ptr, xs_ptr, xsum_ptr, qw_ptr, ws_ptr, gs_ptr, gz_ptr, wz_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
        N, K,
        GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, RAW_OUT: tl.constexpr, BNH: tl.constexpr, BK: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        NH = N // 2
        offs_j = pid_n * BNH + tl.arange(0, BNH)
        j_ok = offs_j < NH
        BK4: tl.constexpr = BK // 4
        offs_i = tl.arange(0, BK4)
        k_iters = tl.cdiv(K, BK)
        per = tl.cdiv(k_iters, SPLIT_K)
        it0 = pid_k * per
        it1 = tl.minimum(it0 + per, k_iters)
        w_ptrs = qw_ptr.to(tl.pointer_type(tl.int32)) + offs_j[:, None] * (K // 4) + offs_i[None, :]
        x_ptrs = x_ptr + 4 * offs_i
        if GROUPED:
            acc_lo = tl.zeros([BNH], dtype=tl.int32)
            acc_hi = tl.zeros([BNH], dtype=tl.int32)
        else:
            acc_lo2 = tl.zeros([BNH, BK4], dtype=tl.int32)
            acc_hi2 = tl.zeros([BNH, BK4], dtype=tl.int32)
        for it in range(it0, it1):
            kb = it * BK
            k_ok = (kb + 4 * offs_i) < K
            wq = tl.load(w_ptrs + kb // 4, mask=j_ok[:, None] & k_ok[None, :], other=0)
            p_lo = tl.zeros([BNH, BK4], dtype=tl.int32)
            p_hi = tl.zeros([BNH, BK4], dtype=tl.int32)
            xs_blk = tl.zeros([BK4], dtype=tl.int32)
            for b in tl.static_range(4):
                xb = tl.load(x_ptrs + kb + b, mask=k_ok, other=0).to(tl.int32)
                p_lo += ((wq >> (8 * b)) & 0xF) * xb[None, :]
                p_hi += ((wq >> (8 * b + 4)) & 0xF) * xb[None, :]
                if GROUPED:
                    xs_blk += xb
            if GROUPED:
                # BK == the group size: one (s1, sz) per row and block
                g = it
                s_lo = tl.load(gs_ptr + g * N + offs_j, mask=j_ok, other=0).to(tl.int32)
                z_lo = tl.load(gz_ptr + g * N + offs_j, mask=j_ok, other=0).to(tl.int32)
                s_hi = tl.load(gs_ptr + g * N + offs_j + NH, mask=j_ok, other=0).to(tl.int32)
                z_hi = tl.load(gz_ptr + g * N + offs_j + NH, mask=j_ok, other=0).to(tl.int32)
                xsum_blk = tl.sum(xs_blk, axis=0)
                acc_lo += s_lo * tl.sum(p_lo, axis=1) - z_lo * xsum_blk
                acc_hi += s_hi * tl.sum(p_hi, axis=1) - z_hi * xsum_blk
            else:
                acc_lo2 += p_lo
                acc_hi2 += p_hi
        if not GROUPED:
            acc_lo = tl.sum(acc_lo2, axis=1)
            acc_hi = tl.sum(acc_hi2, axis=1)
        n_lo = offs_j
        n_hi = offs_j + NH
        do_epilogue = True
        if SPLIT_K > 1:
            tl.store(part_ptr + pid_k * N + n_lo, acc_lo, mask=j_ok)
            tl.store(part_ptr + pid_k * N + n_hi, acc_hi, mask=j_ok)
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            do_epilogue = ticket == SPLIT_K - 1
            if do_epilogue:
                acc_lo = tl.zeros([BNH], dtype=tl.int32)
                acc_hi = tl.zeros([BNH], dtype=tl.int32)
                for s in tl.static_range(SPLIT_K):
                    acc_lo += tl.load(part_ptr + s * N + n_lo, mask=j_ok, other=0, cache_modifier=".cg")
                    acc_hi += tl.load(part_ptr + s * N + n_hi, mask=j_ok, other=0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
        if do_epilogue:
            if not GROUPED:
                xsum = tl.load(xsum_ptr)
                acc_lo -= tl.load(wz_ptr + n_lo, mask=j_ok, other=0).to(tl.int32) * xsum
                acc_hi -= tl.load(wz_ptr + n_hi, mask=j_ok, other=0).to(tl.int32) * xsum
            if RAW_OUT:
                tl.store(out_ptr + n_lo, acc_lo, mask=j_ok)
                tl.store(out_ptr + n_hi, acc_hi, mask=j_ok)
            else:
                xs = tl.load(xs_ptr)
                y_lo = acc_lo.to(tl.float32) * xs * tl.load(ws_ptr + n_lo, mask=j_ok, other=0.0)
                y_hi = acc_hi.to(tl.float32) * xs * tl.load(ws_ptr + n_hi, mask=j_ok, other=0.0)
                if HAS_BIAS:
                    y_lo += tl.load(bias_ptr + n_lo, mask=j_ok, other=0.0).to(tl.float32)
                    y_hi += tl.load(bias_ptr + n_hi, mask=j_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + n_lo, y_lo.to(out_ptr.dtype.element_ty), mask=j_ok)
                tl.store(out_ptr + n_hi, y_hi.to(out_ptr.dtype.element_ty), mask=j_ok)

    return w4a8_gemv_kernel


def gemv_config(n: int, k: int, group_size: int, device: torch.device) -> Optional[dict]:
    """The tuned entry for (device, variant, N, K) in configs/w4a8_gemv.json, or None; the variant
    is ``g<G>`` for progressive weights in groups of ``group_size`` G (0: ``channel``). The table
    only holds shapes where the GEMV measured faster than the tensor-core GEMM at M = 1
    (scripts/tune_gemv.py), so elsewhere the GEMM runs. On the H200 it holds nothing today: per
    channel the GEMM's int8 MMAs always won (by 9-31%), and for g128 the GEMV's last win (28672 x 4096,
    run h200-s19f) went when the GEMM got packed level-1 words and block sums on the tensor cores
    (run h200-s20b: GEMV 35.0 µs vs GEMM 27.7 µs there, 0.70-0.92x on the four Llama-3-8B shapes).
    The kernel stays for cards whose tuning run finds a win."""
    import json
    from pathlib import Path

    from .w4a8_gemm import device_key

    path = Path(__file__).with_name("configs") / "w4a8_gemv.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    variant = f"g{group_size}" if group_size else "channel"
    cfg = table.get(device_key(device), {}).get(variant, {}).get(f"{n},{k}")
    if cfg and group_size and cfg["BK"] != group_size:
        raise ValueError(f"configs/w4a8_gemv.json {variant} {n},{k}: BK must be the group size, got {cfg['BK']}")
    return dict(cfg) if cfg else None


def can_implement_gemv(w: W4A8Weight) -> tuple[bool, str]:
    if w.k % 4:
        return False, f"K={w.k}: weight rows are read as int32 words"
    return True, "ok"
