"""Fused RMSNorm + per-token INT8 quantization, and plain per-token INT8 quantization.

Produces exactly what `natix.kernels.w4a8_gemm` consumes: ``xq`` int8 [M, H], ``x_scale`` float32 [M]
(``x ~= x_scale[m] * xq[m, :]``) and ``x_sum`` int32 [M] (sum of the codes of each row, for the
per-channel GEMM's zero correction). One program per row, one read of the row from memory.

Rounding is round-half-away-from-zero, computed as ``floor(|v| + 0.5) * sign(v)`` in float32 in
both the kernel and the reference, codes clamped to [-127, 127].
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch


def rmsnorm_quant_reference(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, H] fp16/bf16/fp32, weight [H] or None (plain quantization) -> (xq int8 [M, H],
    x_scale float32 [M], x_sum int32 [M])."""
    y = x.float()
    if weight is not None:
        inv = 1.0 / torch.sqrt((y * y).mean(dim=-1, keepdim=True) + eps)
        y = (y * inv) * weight.float()
    amax = y.abs().amax(dim=-1).clamp_min(1e-10)
    scale = amax / 127.0
    inv_s = 127.0 / amax
    v = y * inv_s[:, None]
    q = (torch.floor(v.abs() + 0.5) * torch.sign(v)).clamp(-127, 127).to(torch.int8)
    return q, scale, q.to(torch.int32).sum(-1, dtype=torch.int32)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_quant_kernel(
        x_ptr, w_ptr, q_ptr, s_ptr, sum_ptr, H, stride_x, stride_q, eps,
        NORM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        y = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            ms = tl.sum(y * y, axis=0) / H
            inv = 1.0 / tl.sqrt(ms + eps)
            y = (y * inv) * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-10)
        inv_s = 127.0 / amax
        v = y * inv_s
        a = tl.floor(tl.abs(v) + 0.5)
        q = tl.minimum(tl.where(v < 0, -a, a), 127.0)
        q = tl.maximum(q, -127.0).to(tl.int32)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=ok)
        tl.store(s_ptr + row, amax / 127.0)
        tl.store(sum_ptr + row, tl.sum(tl.where(ok, q, 0), axis=0))

    return rmsnorm_quant_kernel


def rmsnorm_quant_triton(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import triton

    _check(x, weight)
    m, h = x.shape
    q = torch.empty((m, h), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    sm = torch.empty((m,), dtype=torch.int32, device=x.device)
    if m == 0:
        return q, s, sm
    block = triton.next_power_of_2(h)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _kernel()[(m,)](
        x, weight if weight is not None else x, q, s, sm, h, x.stride(0), q.stride(0), eps,
        NORM=weight is not None, BLOCK=block, num_warps=warps,
    )
    return q, s, sm


def _check(x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16/bf16/fp32 [M, H] with unit H stride, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] > 65536:
        raise ValueError(f"H={x.shape[1]} > 65536: one row must fit one program")
    if weight is not None and (tuple(weight.shape) != (x.shape[1],) or not weight.is_contiguous()):
        raise ValueError(f"weight must be contiguous [{x.shape[1]}]")


@torch.library.custom_op("natix::rmsnorm_quant", mutates_args=())
def _rmsnorm_quant_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return rmsnorm_quant_triton(x, weight, eps)
    _check(x, weight)
    return rmsnorm_quant_reference(x, weight, eps)


@_rmsnorm_quant_op.register_fake
def _(x, weight, eps):
    m, h = x.shape
    return (x.new_empty((m, h), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.int32))


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm(x [M, H]) * weight [H] -> (xq int8 [M, H], x_scale float32 [M], x_sum int32 [M])."""
    return torch.ops.natix.rmsnorm_quant(x, weight, eps)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, H] -> (xq int8 [M, H], x_scale float32 [M], x_sum int32 [M]), no normalization."""
    return torch.ops.natix.rmsnorm_quant(x, None, 0.0)
