"""KV4: a paged UINT4 key/value cache with a scale and zero per (token, head, channel group), and
quantize-on-write.

Layout (paged as in vLLM; a page holds ``page_size`` consecutive tokens of one sequence):

==============  =======  ===========================================  =====================================
tensor          dtype    shape                                        meaning
==============  =======  ===========================================  =====================================
``k``, ``v``    uint8    [num_pages, H_kv, page_size, D // 2]         codes; byte ``d`` holds dim ``d`` in
                                                                      the low and ``d + D/2`` in the high
                                                                      nibble
``k_scale``...  float16  [num_pages, H_kv, page_size, NG]            ``k_scale, k_zero, v_scale, v_zero``:
                                                                      one per group of ``D / NG`` channels
==============  =======  ===========================================  =====================================

Channel groups: ``NG = 1`` (the QServe format) quantizes a head's ``D`` channels with one scale and
zero; ``NG > 1`` splits them into contiguous groups of ``group_size = D / NG`` channels (group ``j``:
dims ``j * group_size ...``), a power of two between 16 and ``D / 2``, so each group lies in one
nibble half. Finer groups bound the error an outlier channel causes to its own group
(reports/quant-accuracy-notes.md, "KV4 channel groups"); they cost ``8 * (NG - 1)`` bytes more per token
and head, keys and values together.

Dequantization: ``x[d] ~= code[d] * scale[g(d)] + zero[g(d)]`` (asymmetric; ``zero`` is the group
minimum, kept as an fp16 offset rather than an integer code; with one group attention applies it once
per token: ``q.k = scale * (q . codes) + zero * sum(q)``, and ``p.v = (p*scale) . codes + sum(p*zero)``).
Head-major pages put one (page, head)'s ``page_size * D/2`` bytes contiguous, the unit a decode
program streams. A token's slot is ``page * page_size + offset``; slot < 0 means "skip" (padding).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KV4Cache:
    """The six tensors of one layer's KV4 cache (see module docstring)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor

    @staticmethod
    def empty(num_pages: int, num_kv_heads: int, page_size: int, head_dim: int, device="cpu",
              group_size: int = -1) -> "KV4Cache":
        """Zeroed pages; ``group_size`` channels per scale and zero (-1: the whole head)."""
        if head_dim % 2 or page_size & (page_size - 1):
            raise ValueError("head_dim must be even and page_size a power of two")
        ng = num_groups(head_dim, group_size)
        c = lambda: torch.zeros((num_pages, num_kv_heads, page_size, head_dim // 2), dtype=torch.uint8, device=device)  # noqa: E731
        m = lambda: torch.zeros((num_pages, num_kv_heads, page_size, ng), dtype=torch.float16, device=device)  # noqa: E731
        return KV4Cache(c(), c(), m(), m(), m(), m())

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * 2

    @property
    def num_groups(self) -> int:
        return self.k_scale.shape[3]

    @property
    def group_size(self) -> int:
        return self.head_dim // self.num_groups

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero)

    def validate(self) -> None:
        for t in (self.k, self.v):
            if t.dtype != torch.uint8 or t.dim() != 4 or not t.is_contiguous() or t.shape != self.k.shape:
                raise ValueError("k/v must be contiguous uint8 [num_pages, H_kv, page_size, D//2]")
        ng = self.k_scale.shape[-1] if self.k_scale.dim() == 4 else 0
        for t in self.tensors()[2:]:
            if t.dtype != torch.float16 or t.shape != (*self.k.shape[:3], ng) or not t.is_contiguous():
                raise ValueError("scales/zeros must be contiguous float16 [num_pages, H_kv, page_size, groups]")
        num_groups(self.head_dim, self.head_dim // ng)


def kv_groups(head_dim: int, group_size: int) -> int:
    """Groups per head for a scheme's ``kv_group_size`` (w4a8kv4): -1 or at least ``head_dim`` -> 1;
    else the largest power of two up to ``group_size`` that divides ``head_dim / 2`` and is at least
    16 (the weights' "finer" fallback), or one group when there is none (a head too narrow to split)."""
    g = group_size
    if g == -1 or g >= head_dim:
        return 1
    while g >= 16 and (head_dim // 2) % g:
        g //= 2
    return head_dim // g if g >= 16 and head_dim % 2 == 0 else 1


def num_groups(head_dim: int, group_size: int) -> int:
    """Groups per head for ``group_size`` channels per scale (-1 or ``head_dim``: one); ValueError
    unless it is a power of two in [16, head_dim / 2] (a group lies in one nibble half)."""
    if group_size in (-1, head_dim):
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1) or (head_dim // 2) % group_size:
        raise ValueError(f"KV4 group size must be -1 (the whole head) or a power of two from 16 to "
                         f"head_dim/2 = {head_dim // 2}, got {group_size!r}")
    return head_dim // group_size


def quantize_rows_reference(x: torch.Tensor, num_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D] in 0..15, scale fp16 [..., NG], zero fp16 [..., NG]): each
    row's ``num_groups`` contiguous groups of ``D / NG`` channels quantized asymmetrically."""
    shape = x.shape
    x = x.float().reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    zero = lo.to(torch.float16)
    s, z = scale.float(), zero.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    q = torch.floor((x - z[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
    return q.reshape(shape), scale, zero


def kv4_write_reference(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """In place: quantize k, v [T, H_kv, D] and store them at ``slots`` int [T] (slot < 0: skip)."""
    ps, dh = cache.page_size, cache.head_dim // 2
    keep = slots >= 0
    slots, k, v = slots[keep].long(), k[keep], v[keep]
    page, off = slots // ps, slots % ps
    for x, codes, sc, zr in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        q, s, z = quantize_rows_reference(x, cache.num_groups)  # [T, H, D], [T, H, NG]
        packed = q[..., :dh] | (q[..., dh:] << 4)
        codes[page, :, off] = packed
        sc[page, :, off] = s
        zr[page, :, off] = z


def dequantize_rows_reference(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes [..., D] (0..15, unpacked) + scale/zero [..., NG] -> float32 [..., D]: ``code * scale + zero``
    of each code's group (the inverse of :func:`quantize_rows_reference`)."""
    gs = q.shape[-1] // scale.shape[-1]
    return q.float() * scale.float().repeat_interleave(gs, -1) + zero.float().repeat_interleave(gs, -1)


def dequantize_pages(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[P, H, S, D/2] codes + [P, H, S, NG] scale/zero -> float32 [P, H, S, D]."""
    return dequantize_rows_reference(torch.cat([codes & 0xF, codes >> 4], dim=-1), scale, zero)


@functools.lru_cache(maxsize=None)
def store_helper():
    """The Triton helper both cache writers (this module's kernel and the fused RoPE + write,
    `natix.kernels.rope_cache_write`) quantize and store with: ``kv4_store(a, b, codes, scale, zero,
    row, ok, HP, HALF, NG)`` takes one token's ``HP`` head rows as their float32 low and high halves
    ``a, b [HP, HALF]`` and writes their codes, scales and zeros at cache rows ``row [HP]`` (``ok``:
    the rows that exist), with ``NG`` groups per head (module docstring). A kernel calls it by
    name after ``globals().update(kv4_store=store_helper())`` in its own module."""
    import triton
    import triton.language as tl

    @triton.jit
    def _group_quant(x, HP: tl.constexpr, HALF: tl.constexpr, NGH: tl.constexpr):
        # x float32 [HP, HALF] -> codes uint8 [HP, HALF], scale and zero fp16 [HP, NGH]
        GS: tl.constexpr = HALF // NGH
        x3 = tl.reshape(x, (HP, NGH, GS))
        lo = tl.min(x3, axis=2)
        s16 = ((tl.max(x3, axis=2) - lo) / 15.0).to(tl.float16)
        z16 = lo.to(tl.float16)
        sf = s16.to(tl.float32)
        inv = tl.where(sf > 0, 1.0 / tl.where(sf > 0, sf, 1.0), 0.0)
        q = tl.floor((x3 - z16.to(tl.float32)[:, :, None]) * inv[:, :, None] + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.uint8)
        return tl.reshape(q, (HP, HALF)), s16, z16

    @triton.jit
    def kv4_store(a, b, codes, sc, zr, row, ok, HP: tl.constexpr, HALF: tl.constexpr, NG: tl.constexpr):
        d = tl.arange(0, HALF)
        if NG == 1:  # one group over both halves
            lo = tl.minimum(tl.min(a, axis=1), tl.min(b, axis=1))
            hi = tl.maximum(tl.max(a, axis=1), tl.max(b, axis=1))
            s16 = ((hi - lo) / 15.0).to(tl.float16)
            z16 = lo.to(tl.float16)
            s = s16.to(tl.float32)
            z = z16.to(tl.float32)
            inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
            qa = tl.minimum(tl.maximum(tl.floor((a - z[:, None]) * inv[:, None] + 0.5), 0.0), 15.0).to(tl.uint8)
            qb = tl.minimum(tl.maximum(tl.floor((b - z[:, None]) * inv[:, None] + 0.5), 0.0), 15.0).to(tl.uint8)
            tl.store(sc + row, s16, mask=ok)
            tl.store(zr + row, z16, mask=ok)
        else:
            NGH: tl.constexpr = NG // 2
            gi = tl.arange(0, NGH)
            qa, sa, za = _group_quant(a, HP, HALF, NGH)
            qb, sb, zb = _group_quant(b, HP, HALF, NGH)
            m = row[:, None] * NG + gi[None, :]
            tl.store(sc + m, sa, mask=ok[:, None])
            tl.store(zr + m, za, mask=ok[:, None])
            tl.store(sc + m + NGH, sb, mask=ok[:, None])
            tl.store(zr + m + NGH, zb, mask=ok[:, None])
        tl.store(codes + row[:, None] * HALF + d[None, :], qa | (qb << 4), mask=ok[:, None])

    # kernels resolve helper names through this module's globals (triton is imported lazily); ``tl``
    # too, for Triton's interpreter, which looks for triton.language among a called helper's globals
    globals().update(_group_quant=_group_quant, tl=tl)
    return kv4_store


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    globals().update(kv4_store=store_helper())

    @triton.jit
    def kv4_write_kernel(
        k_ptr, v_ptr, slot_ptr, kc, vc, ks, kz, vs, vz, stride_kt, stride_kh, stride_vt, stride_vh,
        H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, PAGE: tl.constexpr, NG: tl.constexpr,
    ):
        t = tl.program_id(0)
        which = tl.program_id(1)  # 0: keys, 1: values
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            page = slot // PAGE
            off = slot % PAGE
            h = tl.arange(0, HP)
            d = tl.arange(0, DH)
            h_ok = h < H
            row = (page * H + h) * PAGE + off  # [HP]
            if which == 0:
                src = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
                codes, sc_ptr, zr_ptr = kc, ks, kz
            else:
                src = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
                codes, sc_ptr, zr_ptr = vc, vs, vz
            x_lo = tl.load(src, mask=h_ok[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(src + DH, mask=h_ok[:, None], other=0.0).to(tl.float32)
            kv4_store(x_lo, x_hi, codes, sc_ptr, zr_ptr, row, h_ok, HP, DH, NG)  # noqa: F821 (globals().update above)

    return kv4_write_kernel


def _check(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    cache.validate()
    want = (cache.num_kv_heads, cache.head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape[1:]) != want or x.stride(2) != 1:
            raise ValueError(f"{name} must be [T, {want[0]}, {want[1]}] with unit D stride, got {tuple(x.shape)}")
    if slots.dtype not in (torch.int32, torch.int64) or tuple(slots.shape) != (k.shape[0],) or v.shape[0] != k.shape[0]:
        raise ValueError(f"slots must be int32/int64 [{k.shape[0]}]")


def kv4_write_triton(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    import triton

    _check(cache, k, v, slots)
    if k.shape[0] == 0:
        return
    h = cache.num_kv_heads
    _kernel()[(k.shape[0], 2)](
        k, v, slots.contiguous(), *cache.tensors(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H=h, HP=triton.next_power_of_2(h), DH=cache.head_dim // 2, PAGE=cache.page_size, NG=cache.num_groups,
        num_warps=4,
    )


@torch.library.custom_op(
    "natix::kv4_write", mutates_args=("k_cache", "v_cache", "k_scale", "k_zero", "v_scale", "v_zero")
)
def _kv4_write_op(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: torch.Tensor, k_zero: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
) -> None:
    cache = KV4Cache(k_cache, v_cache, k_scale, k_zero, v_scale, v_zero)
    if k.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        kv4_write_triton(cache, k, v, slots)
    else:
        _check(cache, k, v, slots)
        kv4_write_reference(cache, k, v, slots)


@_kv4_write_op.register_fake
def _(k, v, slots, k_cache, v_cache, k_scale, k_zero, v_scale, v_zero):
    return None


def kv4_write(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize new keys/values k, v [T, H_kv, D] into ``cache`` at ``slots`` [T] (in place).

    Decode writes T = batch tokens; prefill runs SDPA on bf16 and then writes its T tokens here.
    """
    torch.ops.natix.kv4_write(k, v, slots, *cache.tensors())


@functools.lru_cache(maxsize=None)
def _gather_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv4_gather_kernel(pages_ptr, kc, vc, ks, kz, vs, vz, k_out, v_out,
                          H: tl.constexpr, DH: tl.constexpr, PAGE: tl.constexpr, NG: tl.constexpr):
        i = tl.program_id(0)  # the i-th gathered page
        h = tl.program_id(1)
        which = tl.program_id(2)  # 0: keys, 1: values
        page = tl.load(pages_ptr + i).to(tl.int64)
        t = tl.arange(0, PAGE)
        d = tl.arange(0, DH)
        row = (page * H + h) * PAGE + t  # [PAGE] cache rows
        if which == 0:
            codes, sc, zr, out = kc, ks, kz, k_out
        else:
            codes, sc, zr, out = vc, vs, vz, v_out
        c = tl.load(codes + row[:, None] * DH + d[None, :]).to(tl.int32)  # [PAGE, DH]
        GS: tl.constexpr = 2 * DH // NG  # channels a group; dims d (low nibbles) and DH + d (high)
        g_lo = (d // GS)[None, :]
        g_hi = ((DH + d) // GS)[None, :]
        lo = (c & 15).to(tl.float32) * tl.load(sc + row[:, None] * NG + g_lo).to(tl.float32) \
            + tl.load(zr + row[:, None] * NG + g_lo).to(tl.float32)
        hi = (c >> 4).to(tl.float32) * tl.load(sc + row[:, None] * NG + g_hi).to(tl.float32) \
            + tl.load(zr + row[:, None] * NG + g_hi).to(tl.float32)
        dst = out + ((i * PAGE + t)[:, None] * H + h) * (2 * DH) + d[None, :]  # [p * PAGE, H, D] rows
        tl.store(dst, lo.to(out.dtype.element_ty))
        tl.store(dst + DH, hi.to(out.dtype.element_ty))

    return kv4_gather_kernel


def kv4_gather(cache: KV4Cache, pages: torch.Tensor, dtype: torch.dtype,
               triton_kernel: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token slot of ``pages`` (long [p], on the cache's device), dequantized into token-major
    keys and values [p * page_size, H_kv, D] in ``dtype``: what :func:`dequantize_pages` computes, in
    one Triton launch (``triton_kernel``: by default on CUDA; else the torch reference). Both compute
    ``code * scale + zero`` in float32; the kernel may fuse it (one ``dtype`` rounding apart)."""
    p, h, s, d = len(pages), cache.num_kv_heads, cache.page_size, cache.head_dim
    if not (cache.k.is_cuda if triton_kernel is None else triton_kernel):
        out = []
        for codes, sc, zr in ((cache.k, cache.k_scale, cache.k_zero), (cache.v, cache.v_scale, cache.v_zero)):
            x = dequantize_pages(codes[pages], sc[pages], zr[pages]).to(dtype)
            out.append(x.permute(0, 2, 1, 3).reshape(-1, h, d))
        return out[0], out[1]
    k = torch.empty((p * s, h, d), dtype=dtype, device=cache.k.device)
    v = torch.empty_like(k)
    if p:
        _gather_kernel()[(p, h, 2)](pages, *cache.tensors(), k, v, H=h, DH=d // 2, PAGE=s, NG=cache.num_groups,
                                    num_warps=4)
    return k, v
