"""Rotary position embedding applied in place to the query and key heads of a fused QKV output.

Convention: transformers' Llama family ("rotate half"): for ``i < D/2`` the pair is
``(x[i], x[i + D/2])`` and ``out = (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``cos, sin`` of
``position * inv_freq[i]`` (times the rope type's attention scaling, already folded into the
table). ``cos_sin [max_positions, D]`` float32 holds ``cos`` in columns ``[0, D/2)`` and ``sin`` in
``[D/2, D)``; build it with :func:`cos_sin_table` from the model's ``inv_freq``.

``q [T, Hq, D]`` and ``k [T, Hkv, D]`` may be strided views (the column slices of one QKV GEMM
output): one program per token rotates all of its heads, one launch for both tensors.
"""
from __future__ import annotations

import functools
import os

import torch


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """float32 [max_positions, D] = [cos | sin] of ``pos * inv_freq`` (``inv_freq [D/2]``), times
    ``scaling`` (transformers' ``attention_scaling``, 1 for the default rope type)."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).contiguous()


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """In place; the arithmetic of transformers' ``apply_rotary_pos_emb`` (cos/sin cast to the
    tensors' dtype, products in that dtype)."""
    half = cos_sin.shape[1] // 2
    cs = cos_sin[positions.long()]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]
    for x in (q, k):
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.copy_(x * c + rot * s)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                    HQ: tl.constexpr, HK: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF)
        c = tl.load(cs_ptr + pos * (2 * HALF) + d)[None, :]
        s = tl.load(cs_ptr + pos * (2 * HALF) + HALF + d)[None, :]
        h = tl.arange(0, HP)
        for which in tl.static_range(2):
            if which == 0:
                base = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
                ok = (h < HQ)[:, None]
            else:
                base = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
                ok = (h < HK)[:, None]
            x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
            tl.store(base, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=ok)
            tl.store(base + HALF, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=ok)

    return rope_kernel


@functools.lru_cache(maxsize=None)
def _launcher(hq: int, hk: int, hp: int, half: int):
    from .launch import Launcher

    return Launcher(_kernel(), HQ=hq, HK=hk, HP=hp, HALF=half, num_warps=4)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.stride(2) != 1:
            raise ValueError(f"{name} must be [T, H, D] with unit D stride, got {tuple(x.shape)} {x.stride()}")
    d = q.shape[2]
    if k.shape[2] != d or k.shape[0] != q.shape[0] or q.dtype != k.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} disagree")
    if d % 2 or d & (d - 1):
        raise ValueError(f"head_dim={d}: the kernel needs a power of two (rotary over the whole head)")
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or cos_sin.shape[1] != d or not cos_sin.is_contiguous():
        raise ValueError(f"cos_sin must be contiguous float32 [max_positions, {d}]")
    if tuple(positions.shape) != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}]")


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                check: bool = True) -> None:
    import triton

    if check:
        _check(q, k, positions, cos_sin)
    if q.shape[0] == 0:
        return
    hq, hk = q.shape[1], k.shape[1]
    _launcher(hq, hk, triton.next_power_of_2(max(hq, hk)), q.shape[2] // 2)(
        (q.shape[0],), q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1))


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]``."""
    if q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        rope_triton(q, k, positions, cos_sin)
        return
    _check(q, k, positions, cos_sin)
    rope_reference(q, k, positions, cos_sin)


@torch.library.custom_op("natix::rope", mutates_args=("q", "k"))
def _rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    rope_(q, k, positions, cos_sin)


@_rope_op.register_fake
def _(q, k, positions, cos_sin):
    return None
