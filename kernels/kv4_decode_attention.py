"""Decode attention over a paged KV4 cache (`natix.kernels.kv4_cache`): GQA, per-row lengths, split-K.

One program per (batch row, KV head, split) handles all ``G = H_q / H_kv`` query heads of that KV
head, so each cache byte is read once. The scores never dequantize K:
``s[t] = k_scale[t] * (q . codes[t]) + k_zero[t] * sum(q)``; and V folds its scale into the
probabilities: ``o = (p * v_scale) . codes + sum(p * v_zero)``. Both products run on fp16 tensor
cores (codes 0..15 are exact in fp16) with fp32 accumulation. Default loop (``swap=True``): tokens are the
MMA's M dimension and the G query heads its N (padded to 8), so on sm_90 the dequantized tile is a register
A operand of wgmma; ``swap=False`` keeps the earlier loop (G query rows padded to 16, tile via shared memory).
A cache with channel groups (``NG > 1`` scales per token and head) runs the swap-AB loop with the groups
stacked along the MMAs' N dimension (column ``j * GP + g``: query head g's dims of group j, the others
zeroed), so each nibble half is still one MMA for the scores and one for the values, on exact fp16 codes,
and each group's scale and zero are applied per column outside the products, as with one group.
With more than one split (flash-decoding), each split writes an unnormalised partial output and its
(max, sum) and a second small kernel combines them; with one split the first kernel writes the output.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .kv4_cache import KV4Cache, dequantize_pages

_LOG2E = 1.4426950408889634


def kv4_decode_attention_reference(
    q: torch.Tensor, cache: KV4Cache, block_tables: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """q [B, H_q, D] -> out [B, H_q, D] (q.dtype): softmax over the dequantized cache, float32."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        pages = block_tables[i, : -(-n // cache.page_size)].long()
        kd = dequantize_pages(cache.k[pages], cache.k_scale[pages], cache.k_zero[pages])  # [p, H, S, D]
        vd = dequantize_pages(cache.v[pages], cache.v_scale[pages], cache.v_zero[pages])
        k = kd.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n]  # [H, n, D]
        v = vd.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n]
        qi = q[i].float().view(hkv, g, d)
        p = torch.softmax(qi @ k.transpose(1, 2) * sm_scale, dim=-1)
        out[i] = (p @ v).reshape(hq, d)
    return out.to(q.dtype)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _nib16(c, SHIFT: tl.constexpr):
        # uint8 codes -> fp16 nibble values: OR the nibble into the fp16 pattern of 1024 (0x6400) and
        # subtract 1024 exactly (no int->float conversion instruction)
        x = ((c.to(tl.int16) >> SHIFT) & 15) | 0x6400
        return x.to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def _words16(w, SHIFT: tl.constexpr, BT: tl.constexpr, DH: tl.constexpr):
        # int32 words (4 code bytes) -> fp16 [BT, DH] nibble values (bytes in order along the row)
        e = ((w >> SHIFT) & 0x000F000F) | 0x64006400
        o = ((w >> (SHIFT + 8)) & 0x000F000F) | 0x64006400
        x = tl.reshape(tl.join(tl.join(e.to(tl.int16).to(tl.float16, bitcast=True),
                                       (e >> 16).to(tl.int16).to(tl.float16, bitcast=True)),
                               tl.join(o.to(tl.int16).to(tl.float16, bitcast=True),
                                       (o >> 16).to(tl.int16).to(tl.float16, bitcast=True))), (BT, DH))
        return x - 1024.0

    @triton.jit
    def _block_rows(bt_row, h, t0, t_off, t_ok, HKV: tl.constexpr, PAGE: tl.constexpr, ONE_PAGE: tl.constexpr):
        # the cache rows (page * HKV + h) * PAGE + offset of tokens t0 + t_off of one sequence, whose page
        # table row is bt_row; ONE_PAGE: the block lies in one page (one page-table read, and rows
        # t0 % PAGE + t_off that the compiler sees are contiguous)
        if ONE_PAGE:
            row = (tl.load(bt_row + t0 // PAGE).to(tl.int64) * HKV + h) * PAGE + (t0 % PAGE) + t_off
        else:
            t = t0 + t_off
            row = (tl.load(bt_row + t // PAGE, mask=t_ok, other=0).to(tl.int64) * HKV + h) * PAGE + t % PAGE
        return row

    @triton.jit
    def _group_meta(sp, zp, row, t_ok, cj, NG: tl.constexpr, NGH: tl.constexpr, BT: tl.constexpr, NC: tl.constexpr):
        # channel groups stacked along N: every column's group scale and zero [BT, NC] for the low and the
        # high nibble half (groups j and NGH + j), from one [BT] vector load per group
        s_lo = tl.zeros([BT, NC], dtype=tl.float32)
        z_lo = tl.zeros([BT, NC], dtype=tl.float32)
        s_hi = tl.zeros([BT, NC], dtype=tl.float32)
        z_hi = tl.zeros([BT, NC], dtype=tl.float32)
        for j in tl.static_range(NGH):
            cols = (cj == j)[None, :]
            s_lo = tl.where(cols, tl.load(sp + row * NG + j, mask=t_ok, other=0.0).to(tl.float32)[:, None], s_lo)
            z_lo = tl.where(cols, tl.load(zp + row * NG + j, mask=t_ok, other=0.0).to(tl.float32)[:, None], z_lo)
            s_hi = tl.where(cols, tl.load(sp + row * NG + NGH + j, mask=t_ok, other=0.0).to(tl.float32)[:, None], s_hi)
            z_hi = tl.where(cols, tl.load(zp + row * NG + NGH + j, mask=t_ok, other=0.0).to(tl.float32)[:, None], z_hi)
        return s_lo, z_lo, s_hi, z_hi

    # the kernels resolve helper names through the module's globals (triton is imported lazily, so the
    # helpers cannot be module-level definitions)
    globals().update(_nib16=_nib16, _words16=_words16, _block_rows=_block_rows, _group_meta=_group_meta)

    @triton.jit
    def kv4_decode_kernel(
        q_ptr, kc, vc, ks, kz, vs, vz, bt_ptr, len_ptr, out_ptr, po_ptr, pml_ptr,
        qk_scale, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, PAGE: tl.constexpr,
        BT: tl.constexpr, DIRECT: tl.constexpr, SWAP: tl.constexpr, NG: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        seq = tl.load(len_ptr + b)
        chunk = tl.cdiv(tl.cdiv(seq, num_splits), BT) * BT
        start = sp * chunk
        end = tl.minimum(start + chunk, seq)

        g = tl.arange(0, GP)
        d = tl.arange(0, DH)
        g_ok = g < G
        t_off = tl.arange(0, BT)
        # a block of BT tokens starts at a multiple of BT: when BT divides the page it lies in one page,
        # so the page table is read once per block and the block's codes are one contiguous run
        ONE_PAGE: tl.constexpr = PAGE % BT == 0
        if SWAP or NG > 1:
            # the swap layout: query heads are the MMAs' N dimension, [DH, GP] (or [DH, NC]) tiles of q and outputs
            if NG > 1:
                # NGH groups of DH // NGH channels in each nibble half (grp [DH]: a dim's group in its half).
                # The groups are stacked along the MMAs' N dimension: column c = j * GP + g holds query head
                # g's dims of group j (the others zeroed), so one MMA per nibble half gives every group's
                # partial scores [BT, NC] on exact fp16 codes; each column takes its group's scale and zero,
                # and the groups of a head are summed. Values mirror it: column (j, g) carries p[:, g] times
                # group j's scale, and at the end each output dim keeps its own group's column. With
                # NGH * GP = 8 (G = 4 and two groups per half) the MMAs are as wide as one group's.
                NGH: tl.constexpr = NG // 2
                NC: tl.constexpr = NGH * GP
                grp = d // (DH // NGH)
                c = tl.arange(0, NC)
                cg = c % GP
                cj = c // GP
                mine = grp[:, None] == cj[None, :]  # [DH, NC]: a dim's own group's columns
                qx = q_ptr + b * stride_qb + (h * G + cg)[None, :] * stride_qh + d[:, None]  # [DH, NC]
                qx_ok = mine & (cg < G)[None, :]
                q_lo = tl.load(qx, mask=qx_ok, other=0.0).to(tl.float32) * qk_scale
                q_hi = tl.load(qx + DH, mask=qx_ok, other=0.0).to(tl.float32) * qk_scale
                acc_lo = tl.zeros([DH, NC], dtype=tl.float32)
                acc_hi = tl.zeros([DH, NC], dtype=tl.float32)
                zx_lo = tl.zeros([NC], dtype=tl.float32)
                zx_hi = tl.zeros([NC], dtype=tl.float32)
            else:
                # swap-AB: the dequantized cache tile is the MMA's A operand (rows = tokens) and the G query
                # heads are its N dimension (padded to 8, not 16), so the padding costs half the MMAs of the
                # [16, BT] layout, and the layout conversion to the A operand can run on the uint8 codes
                qT = q_ptr + b * stride_qb + (h * G + g)[None, :] * stride_qh + d[:, None]  # [DH, GP]
                q_lo = tl.load(qT, mask=g_ok[None, :], other=0.0).to(tl.float32) * qk_scale
                q_hi = tl.load(qT + DH, mask=g_ok[None, :], other=0.0).to(tl.float32) * qk_scale
                acc_lo = tl.zeros([DH, GP], dtype=tl.float32)
                acc_hi = tl.zeros([DH, GP], dtype=tl.float32)
                z_acc = tl.zeros([GP], dtype=tl.float32)
            q_sum_lo = tl.sum(q_lo, axis=0)  # [GP] or [NC]
            q_sum_hi = tl.sum(q_hi, axis=0)
            if NG == 1:
                q_sum = q_sum_lo + q_sum_hi
            q_lo16 = q_lo.to(tl.float16)
            q_hi16 = q_hi.to(tl.float16)
            m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            for t0 in range(start, end, BT):
                t = t0 + t_off
                t_ok = t < end
                row = _block_rows(bt_ptr + b * stride_bt, h, t0, t_off, t_ok, HKV, PAGE, ONE_PAGE)  # [BT] cache rows
                kcod = tl.load(kc + row[:, None] * DH + d[None, :], mask=t_ok[:, None], other=0)  # uint8 [BT, DH]
                vcod = tl.load(vc + row[None, :] * DH + d[:, None], mask=t_ok[None, :], other=0)  # uint8 [DH, BT]
                if NG > 1:
                    ks_lo, kz_lo, ks_hi, kz_hi = _group_meta(ks, kz, row, t_ok, cj, NG, NGH, BT, NC)
                    sx = tl.dot(_nib16(kcod, 0), q_lo16) * ks_lo + kz_lo * q_sum_lo[None, :] \
                        + tl.dot(_nib16(kcod, 4), q_hi16) * ks_hi + kz_hi * q_sum_hi[None, :]
                    sT = tl.sum(tl.reshape(sx, (BT, NGH, GP)), axis=1)  # [BT, GP]: a head's groups summed
                else:
                    k_s = tl.load(ks + row, mask=t_ok, other=0.0).to(tl.float32)
                    k_z = tl.load(kz + row, mask=t_ok, other=0.0).to(tl.float32)
                    v_s = tl.load(vs + row, mask=t_ok, other=0.0).to(tl.float32)
                    v_z = tl.load(vz + row, mask=t_ok, other=0.0).to(tl.float32)
                    sT = tl.dot(_nib16(kcod, 0), q_lo16) + tl.dot(_nib16(kcod, 4), q_hi16)  # [BT, GP]
                    sT = sT * k_s[:, None] + k_z[:, None] * q_sum[None, :]
                sT = tl.where(t_ok[:, None], sT, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sT, axis=0))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(sT - m_new[None, :])
                l_i = l_i * alpha + tl.sum(p, axis=0)
                if NG > 1:
                    px = tl.reshape(tl.broadcast_to(p[:, None, :], (BT, NGH, GP)), (BT, NC))  # p per column
                    ax = tl.reshape(tl.broadcast_to(alpha[None, :], (NGH, GP)), (NC,))
                    vs_lo, vz_lo, vs_hi, vz_hi = _group_meta(vs, vz, row, t_ok, cj, NG, NGH, BT, NC)
                    zx_lo = zx_lo * ax + tl.sum(px * vz_lo, axis=0)
                    zx_hi = zx_hi * ax + tl.sum(px * vz_hi, axis=0)
                    pv_lo = (px * vs_lo).to(tl.float16)
                    pv_hi = (px * vs_hi).to(tl.float16)
                    acc_lo = acc_lo * ax[None, :] + tl.dot(_nib16(vcod, 0), pv_lo)
                    acc_hi = acc_hi * ax[None, :] + tl.dot(_nib16(vcod, 4), pv_hi)
                else:
                    z_acc = z_acc * alpha + tl.sum(p * v_z[:, None], axis=0)
                    pv = (p * v_s[:, None]).to(tl.float16)  # [BT, GP]
                    acc_lo = acc_lo * alpha[None, :] + tl.dot(_nib16(vcod, 0), pv)
                    acc_hi = acc_hi * alpha[None, :] + tl.dot(_nib16(vcod, 4), pv)
                m_i = m_new
            if NG > 1:  # each output dim keeps its own group's columns
                acc_lo = tl.sum(tl.reshape(tl.where(mine, acc_lo + zx_lo[None, :], 0.0), (DH, NGH, GP)), axis=1)
                acc_hi = tl.sum(tl.reshape(tl.where(mine, acc_hi + zx_hi[None, :], 0.0), (DH, NGH, GP)), axis=1)
            else:
                acc_lo += z_acc[None, :]
                acc_hi += z_acc[None, :]
            inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
            if DIRECT:
                o = out_ptr + b * stride_ob + (h * G + g)[None, :] * stride_oh + d[:, None]
                tl.store(o, (acc_lo * inv[None, :]).to(out_ptr.dtype.element_ty), mask=g_ok[None, :])
                tl.store(o + DH, (acc_hi * inv[None, :]).to(out_ptr.dtype.element_ty), mask=g_ok[None, :])
            else:
                idx = (b * (HKV * G) + h * G + g) * num_splits + sp  # [GP]
                po = po_ptr + idx[None, :] * (2 * DH) + d[:, None]
                tl.store(po, acc_lo, mask=g_ok[None, :])
                tl.store(po + DH, acc_hi, mask=g_ok[None, :])
                tl.store(pml_ptr + idx * 2, m_i, mask=g_ok)
                tl.store(pml_ptr + idx * 2 + 1, l_i, mask=g_ok)
        else:
            q_base = q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :]
            q_lo = tl.load(q_base, mask=g_ok[:, None], other=0.0).to(tl.float32) * qk_scale
            q_hi = tl.load(q_base + DH, mask=g_ok[:, None], other=0.0).to(tl.float32) * qk_scale
            q_sum = tl.sum(q_lo, axis=1) + tl.sum(q_hi, axis=1)
            q_lo16 = q_lo.to(tl.float16)
            q_hi16 = q_hi.to(tl.float16)

            m_i = tl.full([GP], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            acc_lo = tl.zeros([GP, DH], dtype=tl.float32)
            acc_hi = tl.zeros([GP, DH], dtype=tl.float32)
            z_acc = tl.zeros([GP], dtype=tl.float32)
            DW: tl.constexpr = DH // 4
            w_off = tl.arange(0, DW)
            kc32 = kc.to(tl.pointer_type(tl.int32))
            vc32 = vc.to(tl.pointer_type(tl.int32))
            for t0 in range(start, end, BT):
                t = t0 + t_off
                t_ok = t < end
                row = _block_rows(bt_ptr + b * stride_bt, h, t0, t_off, t_ok, HKV, PAGE, ONE_PAGE)  # [BT] cache rows
                # codes as int32 words (16-byte vector loads), 4 bytes = dims 4i..4i+3 (low nibbles) and
                # DH+4i.. (high nibbles). Folding the 1024 of the fp16 trick into the scores instead (one
                # op fewer) cost 1.2e-2 relative error on the H100: the MMA's fp32 accumulation of
                # ~1024 * sum(q) loses the small difference.
                kw = tl.load(kc32 + row[:, None] * DW + w_off[None, :], mask=t_ok[:, None], other=0)
                k_s = tl.load(ks + row, mask=t_ok, other=0.0).to(tl.float32)
                k_z = tl.load(kz + row, mask=t_ok, other=0.0).to(tl.float32)
                vw = tl.load(vc32 + row[:, None] * DW + w_off[None, :], mask=t_ok[:, None], other=0)
                v_s = tl.load(vs + row, mask=t_ok, other=0.0).to(tl.float32)
                v_z = tl.load(vz + row, mask=t_ok, other=0.0).to(tl.float32)
                k_lo = _words16(kw, 0, BT, DH)
                k_hi = _words16(kw, 4, BT, DH)
                qk = tl.dot(q_lo16, tl.trans(k_lo)) + tl.dot(q_hi16, tl.trans(k_hi))  # [GP, BT]
                s = qk * k_s[None, :] + q_sum[:, None] * k_z[None, :]
                s = tl.where(t_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                z_acc = z_acc * alpha + tl.sum(p * v_z[None, :], axis=1)
                pv = (p * v_s[None, :]).to(tl.float16)
                acc_lo = acc_lo * alpha[:, None] + tl.dot(pv, _words16(vw, 0, BT, DH))
                acc_hi = acc_hi * alpha[:, None] + tl.dot(pv, _words16(vw, 4, BT, DH))
                m_i = m_new

            acc_lo += z_acc[:, None]
            acc_hi += z_acc[:, None]
            if DIRECT:
                inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
                o = out_ptr + b * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :]
                tl.store(o, (acc_lo * inv[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
                tl.store(o + DH, (acc_hi * inv[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
            else:
                # partials: po [B, Hq, S, D] fp32, pml [B, Hq, S, 2] fp32
                hq = h * G + g
                idx = (b * (HKV * G) + hq) * num_splits + sp  # [GP]
                po = po_ptr + idx[:, None] * (2 * DH) + d[None, :]
                tl.store(po, acc_lo, mask=g_ok[:, None])
                tl.store(po + DH, acc_hi, mask=g_ok[:, None])
                tl.store(pml_ptr + idx * 2, m_i, mask=g_ok)
                tl.store(pml_ptr + idx * 2 + 1, l_i, mask=g_ok)

    @triton.jit
    def kv4_combine_kernel(po_ptr, pml_ptr, out_ptr, num_splits, HQ, stride_ob, stride_oh,
                           D: tl.constexpr, SP: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, D)
        s_ok = s < num_splits
        idx = (b * HQ + hq) * num_splits + s
        m = tl.load(pml_ptr + idx * 2, mask=s_ok, other=-1.0e30)
        l = tl.load(pml_ptr + idx * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - m_max)
        lsum = tl.sum(w * l, axis=0)
        o = tl.load(po_ptr + idx[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(o * w[:, None], axis=0)
        inv = tl.where(lsum > 0, 1.0 / lsum, 0.0)
        tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, (o * inv).to(out_ptr.dtype.element_ty))

    return kv4_decode_kernel, kv4_combine_kernel


def default_splits(batch: int, num_kv_heads: int, max_len: int, num_sms: int = 132, bt: int = 64) -> int:
    """Enough splits for ~16 programs per SM (several resident per SM hide the load latency; measured
    best on the H100/H200 tuning runs: 8 splits at B=64, 64 at B=1), each split at least one block."""
    progs = batch * num_kv_heads
    splits = 1
    while progs * splits < 16 * num_sms and max_len // (splits * 2) >= bt and splits < 64:
        splits *= 2
    return splits


def _heads_padded(g: int, num_groups: int, swap: bool) -> int:
    """The query heads' padded width GP: the MMAs' N is GP (swap), 16-row tiles (rows), or with channel
    groups NGH * GP columns (NGH groups per nibble half), at least 8 in all."""
    import triton

    if num_groups > 1:
        return max(triton.next_power_of_2(g), 8 // (num_groups // 2))
    return max(8 if swap else 16, triton.next_power_of_2(g))


def _check(q, cache: KV4Cache, block_tables, seq_lens) -> None:
    cache.validate()
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.stride(2) != 1:
        raise ValueError(f"q must be [B, H_q, {cache.head_dim}] with unit D stride, got {tuple(q.shape)}")
    if q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"H_q={q.shape[1]} is not a multiple of H_kv={cache.num_kv_heads}")
    if q.shape[1] // cache.num_kv_heads > 16:
        raise ValueError("at most 16 query heads per KV head")
    if cache.head_dim // 2 < 16 or cache.head_dim & (cache.head_dim - 1):
        raise ValueError("head_dim must be a power of two >= 32")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError("block_tables must be int32 [B, max_pages]")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (q.shape[0],):
        raise ValueError("seq_lens must be int32 [B]")


def kv4_decode_attention_triton(
    q: torch.Tensor, cache: KV4Cache, block_tables: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
    num_splits: Optional[int] = None, block_t: int = 64, num_warps: int = 4, num_stages: int = 3,
    max_len: Optional[int] = None, swap: bool = True,
) -> torch.Tensor:
    """Launch. ``max_len`` (an upper bound of seq_lens) only sizes the default split count; pass it to
    avoid a device->host sync (``seq_lens.max()``). ``swap`` picks the swap-AB loop (tokens as the MMA's
    M dimension, query heads padded to 8) instead of query heads padded to 16 rows."""
    import triton

    _check(q, cache, block_tables, seq_lens)
    if cache.num_groups > 1 and not swap:
        raise ValueError("a KV4 cache with channel groups is read by the swap loop only (swap=True)")
    b, hq, dim = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    if num_splits is None:
        if max_len is None:
            max_len = block_tables.shape[1] * cache.page_size
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        num_splits = default_splits(b, hkv, max_len, sms, block_t)
    decode, combine = _kernels()
    direct = num_splits == 1
    if direct:
        po = pml = out
    else:
        po = torch.empty((b, hq, num_splits, dim), dtype=torch.float32, device=q.device)
        pml = torch.empty((b, hq, num_splits, 2), dtype=torch.float32, device=q.device)
    decode[(b, hkv, num_splits)](
        q, *cache.tensors(), block_tables, seq_lens, out, po, pml,
        sm_scale * _LOG2E, q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), num_splits,
        HKV=hkv, G=g, GP=_heads_padded(g, cache.num_groups, swap), DH=dim // 2, PAGE=cache.page_size,
        BT=block_t, DIRECT=direct, SWAP=bool(swap), NG=cache.num_groups, num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        combine[(b, hq)](po, pml, out, num_splits, hq, out.stride(0), out.stride(1),
                         D=dim, SP=triton.next_power_of_2(num_splits), num_warps=4)
    return out


@torch.library.custom_op("natix::kv4_decode_attention", mutates_args=())
def _kv4_decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
    v_scale: torch.Tensor, v_zero: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    sm_scale: float, max_len: int,
) -> torch.Tensor:
    cache = KV4Cache(k_cache, v_cache, k_scale, k_zero, v_scale, v_zero)
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return kv4_decode_attention_triton(q, cache, block_tables, seq_lens, sm_scale, max_len=max_len or None)
    _check(q, cache, block_tables, seq_lens)
    return kv4_decode_attention_reference(q, cache, block_tables, seq_lens, sm_scale)


@_kv4_decode_op.register_fake
def _(q, k_cache, v_cache, k_scale, k_zero, v_scale, v_zero, block_tables, seq_lens, sm_scale, max_len):
    return torch.empty_like(q)


def kv4_decode_attention(
    q: torch.Tensor, cache: KV4Cache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    sm_scale: Optional[float] = None, max_len: int = 0,
) -> torch.Tensor:
    """q [B, H_q, D] (one new token per row) attends over ``seq_lens[b]`` cached tokens of row b,
    whose pages are ``block_tables[b, :]`` (int32 [B, max_pages]). Returns [B, H_q, D] in q.dtype."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.natix.kv4_decode_attention(
        q, *cache.tensors(), block_tables, seq_lens, float(sm_scale), int(max_len)
    )
