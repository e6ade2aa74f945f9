"""SwiGLU's ``silu(gate) * up`` on a fused gate/up GEMM output, optionally quantized to INT8 per token.

Input ``gu [M, 2I]``: columns ``[0, I)`` are the gate projection, ``[I, 2I)`` the up projection (one
GEMM computes both). Output ``[M, I]`` in gu's dtype, or with ``quant=True`` the down projection's
W4A8 input ``(xq int8 [M, I], x_scale float32 [M], x_sum int32 [M])`` — the product is quantized
from float32, never rounded to 16 bits first, with the rounding of `natix.kernels.rmsnorm_quant`.

One program per row. The quantized variant holds a row of up to 16384 in registers (one pass); wider
rows take two passes in chunks of ``BLOCK`` (the first finds the row's absolute maximum, the second
recomputes, quantizes and stores), so any ``I`` works; the second read of a row hits L2.
"""
from __future__ import annotations

import functools
import os
from typing import Union

import torch

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def silu_mul_reference(gu: torch.Tensor, quant: bool = False) -> Union[torch.Tensor, Quantized]:
    """Non-quantized: transformers' ``act_fn(gate) * up`` in gu's dtype, exactly."""
    i = gu.shape[-1] // 2
    gate, up = gu[:, :i], gu[:, i:]
    if not quant:
        return torch.nn.functional.silu(gate) * up
    from .rmsnorm_quant import rmsnorm_quant_reference

    return rmsnorm_quant_reference(torch.nn.functional.silu(gate.float()) * up.float(), None)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul_kernel(gu_ptr, y_ptr, q_ptr, s_ptr, sum_ptr, I, stride_gu, stride_y,
                        QUANT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = gu_ptr + row * stride_gu
        offs = tl.arange(0, BLOCK)
        if QUANT and BLOCK >= I:  # the row fits: one pass, every load in flight at once
            ok = offs < I
            g = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(base + I + offs, mask=ok, other=0.0).to(tl.float32)
            y = g / (1.0 + tl.exp(-g)) * u
            amax_s = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-10)
            v = y * (127.0 / amax_s)
            a = tl.floor(tl.abs(v) + 0.5)
            q = tl.maximum(tl.minimum(tl.where(v < 0, -a, a), 127.0), -127.0).to(tl.int32)
            tl.store(q_ptr + row * stride_y + offs, q.to(tl.int8), mask=ok)
            tl.store(s_ptr + row, amax_s / 127.0)
            tl.store(sum_ptr + row, tl.sum(tl.where(ok, q, 0), axis=0))
        elif QUANT:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, I, BLOCK):
                ok = c + offs < I
                g = tl.load(base + c + offs, mask=ok, other=0.0).to(tl.float32)
                u = tl.load(base + I + c + offs, mask=ok, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(g / (1.0 + tl.exp(-g)) * u))
            amax_s = tl.maximum(tl.max(amax, axis=0), 1e-10)
            inv_s = 127.0 / amax_s
            total = tl.zeros([BLOCK], dtype=tl.int32)
            for c in range(0, I, BLOCK):
                ok = c + offs < I
                g = tl.load(base + c + offs, mask=ok, other=0.0).to(tl.float32)
                u = tl.load(base + I + c + offs, mask=ok, other=0.0).to(tl.float32)
                v = g / (1.0 + tl.exp(-g)) * u * inv_s
                a = tl.floor(tl.abs(v) + 0.5)
                q = tl.maximum(tl.minimum(tl.where(v < 0, -a, a), 127.0), -127.0).to(tl.int32)
                tl.store(q_ptr + row * stride_y + c + offs, q.to(tl.int8), mask=ok)
                total += tl.where(ok, q, 0)
            tl.store(s_ptr + row, amax_s / 127.0)
            tl.store(sum_ptr + row, tl.sum(total, axis=0))
        else:
            for c in range(0, I, BLOCK):
                ok = c + offs < I
                g = tl.load(base + c + offs, mask=ok, other=0.0).to(tl.float32)
                u = tl.load(base + I + c + offs, mask=ok, other=0.0).to(tl.float32)
                y = (g / (1.0 + tl.exp(-g))).to(gu_ptr.dtype.element_ty).to(tl.float32) * u
                tl.store(y_ptr + row * stride_y + c + offs, y.to(y_ptr.dtype.element_ty), mask=ok)

    return silu_mul_kernel


@functools.lru_cache(maxsize=None)
def _launcher(quant: bool, block: int, warps: int):
    from .launch import Launcher

    return Launcher(_kernel(), QUANT=quant, BLOCK=block, num_warps=warps)


def _check(gu: torch.Tensor) -> None:
    if gu.dim() != 2 or gu.stride(1) != 1 or gu.shape[1] % 2 or gu.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gu must be fp16/bf16/fp32 [M, 2I] with unit column stride, got {gu.dtype} {tuple(gu.shape)}")


def silu_mul_triton(gu: torch.Tensor, quant: bool = False, check: bool = True) -> Union[torch.Tensor, Quantized]:
    import triton

    if check:
        _check(gu)
    m, i = gu.shape[0], gu.shape[1] // 2
    dev = gu.device
    if quant:
        y = q = torch.empty((m, i), dtype=torch.int8, device=dev)
        s = torch.empty((m,), dtype=torch.float32, device=dev)
        sm = torch.empty((m,), dtype=torch.int32, device=dev)
    else:
        y = q = torch.empty((m, i), dtype=gu.dtype, device=dev)
        s = sm = y
    if m:
        # quantized rows up to 16384 wide go in one pass (16 warps hold 2 x 16384 floats in registers)
        block = triton.next_power_of_2(i) if quant and i <= 16384 else min(4096, triton.next_power_of_2(i))
        warps = 16 if block >= 8192 else (8 if block >= 2048 else 4)
        _launcher(quant, block, warps)((m,), gu, y, q, s, sm, i, gu.stride(0), y.stride(0))
    return (q, s, sm) if quant else y


def silu_mul(gu: torch.Tensor, quant: bool = False) -> Union[torch.Tensor, Quantized]:
    """``gu [M, 2I]`` -> ``silu(gu[:, :I]) * gu[:, I:]`` (see module docstring)."""
    if gu.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return silu_mul_triton(gu, quant)
    _check(gu)
    return silu_mul_reference(gu, quant)


@torch.library.custom_op("natix::silu_mul_quant", mutates_args=())
def _silu_mul_quant_op(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return silu_mul(gu, quant=True)  # type: ignore[return-value]


@_silu_mul_quant_op.register_fake
def _(gu):
    m, i = gu.shape[0], gu.shape[1] // 2
    return (gu.new_empty((m, i), dtype=torch.int8), gu.new_empty((m,), dtype=torch.float32),
            gu.new_empty((m,), dtype=torch.int32))
