"""Residual add + RMSNorm in one pass, with the output either in the model dtype or INT8 per token.

A decoder layer keeps its residual stream ``h`` [M, H] and adds each sublayer's output ``delta``
to it before the next norm. Done separately that is three passes over ``h`` (add, norm, quantize)
and three launches; here it is one program per row and one launch:

``h <- round(h + delta)`` (in h's dtype, written back in place; ``delta=None`` skips the add),
then ``y = rmsnorm(h) * weight``, returned either in h's dtype or, with ``quant=True``, as what
`natix.kernels.w4a8_gemm` consumes: ``(xq int8 [M, H], x_scale float32 [M], x_sum int32 [M])``
with the rounding of `natix.kernels.rmsnorm_quant` (half away from zero, codes in [-127, 127]).

The add is rounded to h's dtype before the norm reads it, as a framework's ``h = h + delta``
followed by a separate norm would be; the norm itself runs in float32.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def add_rmsnorm_reference(
    h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float, quant: bool = False
) -> Union[torch.Tensor, Quantized]:
    """In place ``h += delta`` (if given), then RMSNorm(h) * weight (see module docstring).

    The non-quantized output follows transformers' LlamaRMSNorm exactly: normalise in float32,
    cast to h's dtype, multiply by the weight in that dtype."""
    if delta is not None:
        h.add_(delta)
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if not quant:
        return weight * x.to(h.dtype)
    from .rmsnorm_quant import rmsnorm_quant_reference

    return rmsnorm_quant_reference(x * weight.float(), None)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rmsnorm_kernel(
        h_ptr, d_ptr, w_ptr, y_ptr, q_ptr, s_ptr, sum_ptr, H, stride_h, stride_d, stride_y, eps,
        HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < H
        h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
        if HAS_DELTA:
            h = (h.to(tl.float32) + tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32))
            h = h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
        x = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        if QUANT:
            y = x * inv * w.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-10)
            v = y * (127.0 / amax)
            a = tl.floor(tl.abs(v) + 0.5)
            q = tl.maximum(tl.minimum(tl.where(v < 0, -a, a), 127.0), -127.0).to(tl.int32)
            tl.store(q_ptr + row * stride_y + offs, q.to(tl.int8), mask=ok)
            tl.store(s_ptr + row, amax / 127.0)
            tl.store(sum_ptr + row, tl.sum(tl.where(ok, q, 0), axis=0))
        else:
            # the norm rounded to h's dtype first, then the weight product (transformers' order)
            y = (x * inv).to(h_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
            tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=ok)

    return add_rmsnorm_kernel


@functools.lru_cache(maxsize=None)
def _launcher(has_delta: bool, quant: bool, block: int, warps: int):
    from .launch import Launcher

    return Launcher(_kernel(), HAS_DELTA=has_delta, QUANT=quant, BLOCK=block, num_warps=warps)


def _check(h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if h.dim() != 2 or h.stride(1) != 1 or h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"h must be fp16/bf16/fp32 [M, H] with unit H stride, got {h.dtype} {tuple(h.shape)}")
    if delta is not None and (delta.shape != h.shape or delta.stride(1) != 1):
        raise ValueError(f"delta must be [M, H] = {tuple(h.shape)} with unit H stride, got {tuple(delta.shape)}")
    if tuple(weight.shape) != (h.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{h.shape[1]}]")
    if h.shape[1] > 65536:
        raise ValueError(f"H={h.shape[1]} > 65536: one row must fit one program")


def add_rmsnorm_triton(
    h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float, quant: bool = False,
    check: bool = True,
) -> Union[torch.Tensor, Quantized]:
    """Launch (``check=False`` skips the shape checks: for callers that validated once at load)."""
    import triton

    if check:
        _check(h, delta, weight)
    m, n = h.shape
    dev = h.device
    if quant:
        y = q = torch.empty((m, n), dtype=torch.int8, device=dev)
        s = torch.empty((m,), dtype=torch.float32, device=dev)
        sm = torch.empty((m,), dtype=torch.int32, device=dev)
    else:
        y = q = torch.empty_like(h)
        s = sm = y
    if m:
        block = triton.next_power_of_2(n)
        _launcher(delta is not None, quant, block, 4 if block <= 2048 else (8 if block <= 8192 else 16))(
            (m,), h, delta if delta is not None else h, weight, y, q, s, sm, n, h.stride(0),
            delta.stride(0) if delta is not None else 0, y.stride(0), eps)
    return (q, s, sm) if quant else y


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def add_rmsnorm(
    h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-6, quant: bool = False
) -> Union[torch.Tensor, Quantized]:
    """``h [M, H]`` (updated in place to ``h + delta``), ``delta [M, H]`` or None, ``weight [H]``
    -> RMSNorm(h) * weight: ``[M, H]`` in h's dtype, or with ``quant`` ``(xq, x_scale, x_sum)``.
    CUDA (or the Triton interpreter): the kernel; elsewhere the reference."""
    if _use_triton(h):
        return add_rmsnorm_triton(h, delta, weight, eps, quant)
    _check(h, delta, weight)
    return add_rmsnorm_reference(h, delta, weight, eps, quant)


@torch.library.custom_op("natix::add_rmsnorm_quant", mutates_args=("h",))
def _add_rmsnorm_quant_op(
    h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_rmsnorm(h, delta, weight, eps, quant=True)  # type: ignore[return-value]


@_add_rmsnorm_quant_op.register_fake
def _(h, delta, weight, eps):
    m, n = h.shape
    return (h.new_empty((m, n), dtype=torch.int8), h.new_empty((m,), dtype=torch.float32),
            h.new_empty((m,), dtype=torch.int32))


@torch.library.custom_op("natix::add_rmsnorm", mutates_args=("h",))
def _add_rmsnorm_op(h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rmsnorm(h, delta, weight, eps, quant=False)  # type: ignore[return-value]


@_add_rmsnorm_op.register_fake
def _(h, delta, weight, eps):
    return torch.empty_like(h)
