"""Split-K decode attention's merge and the next GEMM's INT8 quantization, in one launch.

With several splits, KV4 decode attention (`natix.kernels.kv4_decode_attention`) writes per split an
unnormalised output and its (max, sum); a combine kernel merges them into the attention output, and a
W4A8 model then quantizes that row per token for the output projection: two more launches per layer.
Here one program per row merges every head's splits and quantizes the row (two passes over the
partials: the row's absolute maximum, then the codes), producing what `natix.kernels.w4a8_gemm`
consumes. The merged output is rounded to the attention dtype before it is quantized, as the two
separate kernels do, so the codes are the unfused path's.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .kv4_cache import KV4Cache

_LOG2E = 1.4426950408889634


def kv4_decode_partials(q: torch.Tensor, cache: KV4Cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        sm_scale: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run KV4 decode attention's split kernel only: partial outputs po [B, Hq, S, D] and (max, sum)
    pml [B, Hq, S, 2], float32 (the layout its combine kernel reads). Needs ``num_splits > 1``."""
    import triton

    from .kv4_decode_attention import _kernels

    assert num_splits > 1
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    po = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    pml = torch.empty((b, hq, num_splits, 2), dtype=torch.float32, device=q.device)
    _kernels()[0][(b, hkv, num_splits)](
        q, *cache.tensors(), block_tables, seq_lens, po, po, pml, sm_scale * _LOG2E, q.stride(0), q.stride(1),
        block_tables.stride(0), 0, 0, num_splits, HKV=hkv, G=g, GP=max(8, triton.next_power_of_2(g)), DH=d // 2,
        PAGE=cache.page_size, BT=64, DIRECT=False, SWAP=True, num_warps=4, num_stages=3,
    )
    return po, pml


def combine_quant_reference(po: torch.Tensor, pml: torch.Tensor, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the splits (float32), round to ``dtype``, quantize each row [Hq * D] per token."""
    from .rmsnorm_quant import rmsnorm_quant_reference

    m, l = pml[..., 0], pml[..., 1]
    w = torch.exp2(m - m.amax(-1, keepdim=True))
    o = (po * w[..., None]).sum(2) / (w * l).sum(-1, keepdim=True).clamp_min(1e-30)
    o = o.to(dtype).float()
    return rmsnorm_quant_reference(o.reshape(o.shape[0], -1), None)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def combine_quant_kernel(po_ptr, pml_ptr, q_ptr, s_ptr, sum_ptr, num_splits,
                             HQ: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, HB: tl.constexpr,
                             BF16: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        sp = tl.arange(0, SP)
        d = tl.arange(0, D)
        s_ok = (sp < num_splits)[None, :]
        amax = tl.zeros([HB, D], dtype=tl.float32)
        for pas in tl.static_range(2):
            if pas == 1:
                inv_s = 127.0 / tl.maximum(tl.max(tl.max(amax, axis=1), axis=0), 1e-10)
                total = tl.zeros([HB, D], dtype=tl.int32)
            for h0 in tl.static_range(0, HQ, HB):
                h = h0 + tl.arange(0, HB)
                idx = (b * HQ + h)[:, None] * num_splits + sp[None, :]  # [HB, SP]
                m = tl.load(pml_ptr + idx * 2, mask=s_ok, other=-1.0e30)
                l = tl.load(pml_ptr + idx * 2 + 1, mask=s_ok, other=0.0)
                mx = tl.max(m, axis=1)
                w = tl.exp2(m - mx[:, None])
                lsum = tl.sum(w * l, axis=1)
                o = tl.load(po_ptr + idx[:, :, None] * D + d[None, None, :], mask=s_ok[:, :, None], other=0.0)
                o = tl.sum(o * w[:, :, None], axis=1) * tl.where(lsum > 0, 1.0 / lsum, 0.0)[:, None]  # [HB, D]
                if BF16:
                    o = o.to(tl.bfloat16).to(tl.float32)
                else:
                    o = o.to(tl.float16).to(tl.float32)
                if pas == 0:
                    amax = tl.maximum(amax, tl.abs(o))
                else:
                    v = o * inv_s
                    a = tl.floor(tl.abs(v) + 0.5)
                    qv = tl.maximum(tl.minimum(tl.where(v < 0, -a, a), 127.0), -127.0).to(tl.int32)
                    tl.store(q_ptr + b * (HQ * D) + h[:, None] * D + d[None, :], qv.to(tl.int8))
                    total += qv
            if pas == 1:
                tl.store(s_ptr + b, 1.0 / inv_s)
                tl.store(sum_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))

    return combine_quant_kernel


@functools.lru_cache(maxsize=None)
def _launcher(hq: int, d: int, sp: int, hb: int, bf16: bool):
    from .launch import Launcher

    return Launcher(_kernel(), HQ=hq, D=d, SP=sp, HB=hb, BF16=bf16, num_warps=4)


def combine_quant(po: torch.Tensor, pml: torch.Tensor, dtype: torch.dtype,
                  out: Optional[tuple[torch.Tensor, ...]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """po [B, Hq, S, D], pml [B, Hq, S, 2] (float32) -> (xq int8 [B, Hq * D], x_scale float32 [B],
    x_sum int32 [B]); ``dtype`` (bf16 or fp16) is what the attention output is rounded to first."""
    import triton

    b, hq, s, d = po.shape
    if not (po.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return combine_quant_reference(po, pml, dtype)
    q = torch.empty((b, hq * d), dtype=torch.int8, device=po.device)
    xs = torch.empty((b,), dtype=torch.float32, device=po.device)
    xsum = torch.empty((b,), dtype=torch.int32, device=po.device)
    if b:
        hb = math.gcd(hq, 4)
        _launcher(hq, d, triton.next_power_of_2(s), hb, dtype == torch.bfloat16)((b,), po, pml, q, xs, xsum, s)
    return q, xs, xsum
