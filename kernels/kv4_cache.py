"""KV4: a paged UINT4 key/value cache with per-(token, head) scale and zero, and quantize-on-write.

Layout (paged as in vLLM; a page holds ``page_size`` consecutive tokens of one sequence):

==============  =======  ===========================================  =====================================
tensor          dtype    shape                                        meaning
==============  =======  ===========================================  =====================================
``k``, ``v``    uint8    [num_pages, H_kv, page_size, D // 2]         codes; byte ``d`` holds dim ``d`` in
                                                                      the low and ``d + D/2`` in the high
                                                                      nibble
``k_scale``...  float16  [num_pages, H_kv, page_size]                ``k_scale, k_zero, v_scale, v_zero``
==============  =======  ===========================================  =====================================

Dequantization: ``x[d] ~= code[d] * scale + zero`` (asymmetric; ``zero`` is the row minimum, kept as
an fp16 offset rather than an integer code, so that attention can apply it once per token:
``q.k = scale * (q . codes) + zero * sum(q)``, and ``p.v = (p*scale) . codes + sum(p*zero)``).
Head-major pages put one (page, head)'s ``page_size * D/2`` bytes contiguous, the unit a decode
program streams. A token's slot is ``page * page_size + offset``; slot < 0 means "skip" (padding).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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
    def empty(num_pages: int, num_kv_heads: int, page_size: int, head_dim: int, device="cpu") -> "KV4Cache":
        if head_dim % 2 or page_size & (page_size - 1):
            raise ValueError("head_dim must be even and page_size a power of two")
        c = lambda: torch.zeros((num_pages, num_kv_heads, page_size, head_dim // 2), dtype=torch.uint8, device=device)  # noqa: E731
        m = lambda: torch.zeros((num_pages, num_kv_heads, page_size), dtype=torch.float16, device=device)  # noqa: E731
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

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero)

    def validate(self) -> None:
        for t in (self.k, self.v):
            if t.dtype != torch.uint8 or t.dim() != 4 or not t.is_contiguous() or t.shape != self.k.shape:
                raise ValueError("k/v must be contiguous uint8 [num_pages, H_kv, page_size, D//2]")
        for t in self.tensors()[2:]:
            if t.dtype != torch.float16 or t.shape != self.k.shape[:3] or not t.is_contiguous():
                raise ValueError("scales/zeros must be contiguous float16 [num_pages, H_kv, page_size]")


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes uint8 [..., D] in 0..15, scale fp16 [...], zero fp16 [...])."""
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    zero = lo.to(torch.float16)
    s, z = scale.float(), zero.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    q = torch.floor((x - z[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
    return q, scale, zero


def kv4_write_reference(cache: KV4Cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """In place: quantize k, v [T, H_kv, D] and store them at ``slots`` int [T] (slot < 0: skip)."""
    ps, dh = cache.page_size, cache.head_dim // 2
    keep = slots >= 0
    slots, k, v = slots[keep].long(), k[keep], v[keep]
    page, off = slots // ps, slots % ps
    for x, codes, sc, zr in ((k, cache.k, cache.k_scale, cache.k_zero), (v, cache.v, cache.v_scale, cache.v_zero)):
        q, s, z = quantize_rows_reference(x)  # [T, H, D], [T, H]
        packed = q[..., :dh] | (q[..., dh:] << 4)
        codes[page, :, off] = packed
        sc[page, :, off] = s
        zr[page, :, off] = z


def dequantize_pages(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[P, H, S, D/2] codes + [P, H, S] scale/zero -> float32 [P, H, S, D]."""
    q = torch.cat([codes & 0xF, codes >> 4], dim=-1).float()
    return q * scale.float()[..., None] + zero.float()[..., None]


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv4_write_kernel(
        k_ptr, v_ptr, slot_ptr, kc, vc, ks, kz, vs, vz, stride_kt, stride_kh, stride_vt, stride_vh,
        H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, PAGE: tl.constexpr,
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
            lo = tl.minimum(tl.min(x_lo, axis=1), tl.min(x_hi, axis=1))
            hi = tl.maximum(tl.max(x_lo, axis=1), tl.max(x_hi, axis=1))
            s16 = ((hi - lo) / 15.0).to(tl.float16)
            z16 = lo.to(tl.float16)
            s = s16.to(tl.float32)
            z = z16.to(tl.float32)
            inv = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
            q_lo = tl.floor((x_lo - z[:, None]) * inv[:, None] + 0.5)
            q_hi = tl.floor((x_hi - z[:, None]) * inv[:, None] + 0.5)
            q_lo = tl.minimum(tl.maximum(q_lo, 0.0), 15.0).to(tl.uint8)
            q_hi = tl.minimum(tl.maximum(q_hi, 0.0), 15.0).to(tl.uint8)
            tl.store(codes + row[:, None] * DH + d[None, :], q_lo | (q_hi << 4), mask=h_ok[:, None])
            tl.store(sc_ptr + row, s16, mask=h_ok)
            tl.store(zr_ptr + row, z16, mask=h_ok)

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
        H=h, HP=triton.next_power_of_2(h), DH=cache.head_dim // 2, PAGE=cache.page_size, num_warps=4,
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
