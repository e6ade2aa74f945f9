"""A paged 16-bit KV cache (write + decode attention): the unquantized twin of `natix.kernels.kv4_cache`.

The natix engine runs bf16 and fp8 models with this cache, so that a W4A8KV4 model and its
baselines are compared in one engine. Layout per layer, head-major as KV4's:
``k``, ``v`` [num_pages, H_kv, page_size, D] in the model dtype; a token's slot is
``page * page_size + offset``. Decode attention is flash-decoding: one program per (row, KV head,
split) streams that head's pages once for all ``G = H_q / H_kv`` query heads (padded to 16 MMA
rows), online softmax in float32; with several splits, KV4's combine kernel merges the partials.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

_LOG2E = 1.4426950408889634


def paged_write_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          slots: torch.Tensor) -> None:
    """In place: ``k, v [T, H_kv, D]`` into the caches at ``slots [T]`` (slot < 0: skipped)."""
    ps = k_cache.shape[2]
    keep = slots >= 0
    s = slots[keep].long()
    k_cache[s // ps, :, s % ps] = k[keep].to(k_cache.dtype)
    v_cache[s // ps, :, s % ps] = v[keep].to(v_cache.dtype)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [B, H_q, D] -> [B, H_q, D] (q.dtype), softmax in float32 over each row's cached tokens."""
    b, hq, d = q.shape
    hkv, ps = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        pages = block_tables[i, : -(-n // ps)].long()
        kk = k_cache[pages].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
        vv = v_cache[pages].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
        qi = q[i].float().view(hkv, hq // hkv, d)
        p = torch.softmax(qi @ kk.transpose(1, 2) * sm_scale, dim=-1)
        out[i] = (p @ vv).reshape(hq, d)
    return out.to(q.dtype)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_write_kernel(k_ptr, v_ptr, slot_ptr, kc, vc, stride_kt, stride_kh, stride_vt, stride_vh,
                           H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, HP)
            d = tl.arange(0, D)
            ok = (h < H)[:, None]
            row = ((slot // PAGE) * H + h) * PAGE + slot % PAGE
            kx = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
            vx = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
            tl.store(kc + row[:, None] * D + d[None, :], kx.to(kc.dtype.element_ty), mask=ok)
            tl.store(vc + row[:, None] * D + d[None, :], vx.to(vc.dtype.element_ty), mask=ok)

    @triton.jit
    def paged_decode_kernel(
        q_ptr, kc, vc, bt_ptr, len_ptr, out_ptr, po_ptr, pml_ptr,
        qk_scale, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
        BT: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        seq = tl.load(len_ptr + b)
        chunk = tl.cdiv(tl.cdiv(seq, num_splits), BT) * BT
        start = sp * chunk
        end = tl.minimum(start + chunk, seq)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        g_ok = g < G
        t_off = tl.arange(0, BT)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None],
                    other=0.0)
        if DOT_F32:  # the Triton interpreter's bf16 dot is wrong; float32 there, native on the GPU
            q = q.to(tl.float32)
        m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        ONE_PAGE: tl.constexpr = PAGE % BT == 0
        for t0 in range(start, end, BT):
            t = t0 + t_off
            t_ok = t < end
            if ONE_PAGE:
                page = tl.load(bt_ptr + b * stride_bt + t0 // PAGE).to(tl.int64)
                row = (page * HKV + h) * PAGE + (t0 % PAGE) + t_off
            else:
                page = tl.load(bt_ptr + b * stride_bt + t // PAGE, mask=t_ok, other=0).to(tl.int64)
                row = (page * HKV + h) * PAGE + t % PAGE
            k = tl.load(kc + row[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)  # [BT, D]
            v = tl.load(vc + row[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, BT]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if DIRECT:
            inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
            o = out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :]
            tl.store(o, (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:
            idx = (b * (HKV * G) + h * G + g) * num_splits + sp  # [GP]: partials po [B, Hq, S, D], pml [B, Hq, S, 2]
            tl.store(po_ptr + idx[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
            tl.store(pml_ptr + idx * 2, m_i, mask=g_ok)
            tl.store(pml_ptr + idx * 2 + 1, l_i, mask=g_ok)

    return paged_write_kernel, paged_decode_kernel


@functools.lru_cache(maxsize=None)
def _write_launcher(h: int, hp: int, d: int, page: int):
    from .launch import Launcher

    return Launcher(_kernels()[0], H=h, HP=hp, D=d, PAGE=page, num_warps=4)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache must be contiguous [num_pages, H_kv, page_size, D] of one shape")
    if k_cache.dtype not in (torch.float16, torch.bfloat16, torch.float32) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"paged cache dtype must be fp16/bf16/fp32, got {k_cache.dtype}")
    ps, d = k_cache.shape[2], k_cache.shape[3]
    if ps & (ps - 1) or d & (d - 1) or d < 16:
        raise ValueError(f"page_size ({ps}) and head_dim ({d}) must be powers of two, head_dim >= 16")


def paged_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slots: torch.Tensor, check: bool = True) -> None:
    """Store ``k, v [T, H_kv, D]`` (unit D stride) at ``slots [T]`` (int32/int64; < 0 skipped)."""
    if check:
        _check_cache(k_cache, v_cache)
        want = tuple(k_cache.shape[1:2]) + tuple(k_cache.shape[3:])
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 3 or (x.shape[1], x.shape[2]) != want or x.stride(2) != 1 or x.shape[0] != slots.shape[0]:
                raise ValueError(f"{name} must be [T, {want[0]}, {want[1]}] with unit D stride, got {tuple(x.shape)}")
    if not (k.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        paged_write_reference(k_cache, v_cache, k, v, slots)
        return
    if k.shape[0] == 0:
        return
    import triton

    h = k_cache.shape[1]
    _write_launcher(h, triton.next_power_of_2(h), k_cache.shape[3], k_cache.shape[2])(
        (k.shape[0],), k, v, slots, k_cache, v_cache, k.stride(0), k.stride(1), v.stride(0), v.stride(1))


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: Optional[float] = None, max_len: int = 0, num_splits: Optional[int] = None,
    block_t: int = 64, check: bool = True,
) -> torch.Tensor:
    """q [B, H_q, D] (one new token per row) over ``seq_lens[b]`` cached tokens in pages
    ``block_tables[b]`` (int32 [B, max_pages]) -> [B, H_q, D]. ``max_len`` (an upper bound of
    seq_lens; 0 = the block table's width) sizes the split count without a device sync."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if check:
        _check_cache(k_cache, v_cache)
        if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.stride(2) != 1 or q.shape[1] % k_cache.shape[1]:
            raise ValueError(f"q must be [B, H_q, {k_cache.shape[3]}] with H_q a multiple of H_kv={k_cache.shape[1]}")
        if block_tables.dtype != torch.int32 or block_tables.stride(1) != 1 or seq_lens.dtype != torch.int32:
            raise ValueError("block_tables must be int32 [B, max_pages] with contiguous rows, seq_lens int32 [B]")
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, sm_scale)
    import triton

    from .kv4_decode_attention import _kernels as kv4_kernels
    from .kv4_decode_attention import default_splits

    b, hq, d = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if b == 0:
        return out
    bt = min(block_t, page) if page >= 16 else block_t
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = default_splits(b, hkv, max_len or block_tables.shape[1] * page, sms, bt)
    direct = num_splits == 1
    if direct:
        po = pml = out
    else:
        po = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        pml = torch.empty((b, hq, num_splits, 2), dtype=torch.float32, device=q.device)
    _kernels()[1][(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, pml, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), num_splits,
        HKV=hkv, G=hq // hkv, GP=max(16, triton.next_power_of_2(hq // hkv)), D=d, PAGE=page, BT=bt,
        DIRECT=direct, DOT_F32=not q.is_cuda, num_warps=4, num_stages=3,
    )
    if not direct:
        kv4_kernels()[1][(b, hq)](po, pml, out, num_splits, hq, out.stride(0), out.stride(1),
                                  D=d, SP=triton.next_power_of_2(num_splits), num_warps=4)
    return out
