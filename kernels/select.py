"""Kernel selection: which linear kernel runs a (scheme, shape, device), and why not another.

Every kernel answers ``can_implement(spec) -> (ok, reason)``; `make_linear` returns a callable
``f(x [M, K] fp16/bf16) -> [M, N]`` from the first kernel that can, falling back to the pure-torch
reference (the CPU path). Order is explicit: Triton/cuBLAS first, reference last.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .fp8_linear import Fp8Weight, can_implement_scaled_mm, fp8_linear, fp8_linear_reference
from .packing import GROUP_SIZES, W4A8Weight


@dataclass(frozen=True)
class LinearSpec:
    """scheme: 'w4a8_g128' (or g64 / g32: progressive in groups of that many input channels) |
    'w4a8_channel' | 'fp8'; n, k the weight shape; device where it runs."""

    scheme: str
    n: int
    k: int
    device: str = "cuda"
    out_dtype: torch.dtype = torch.bfloat16


def _triton_ok(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False, "INT8 tensor-core tl.dot needs compute capability >= 8.0"
        return True, "ok"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (Triton interpreter)"
    return False, "no CUDA device: the reference runs on CPU"


def can_implement_w4a8(spec: LinearSpec) -> tuple[bool, str]:
    groups = {f"w4a8_g{g}": g for g in GROUP_SIZES}
    if spec.scheme not in groups and spec.scheme != "w4a8_channel":
        return False, f"scheme {spec.scheme!r} is not W4A8"
    if spec.n % 2:
        return False, f"N={spec.n} is odd: the packed format pairs rows j and j+N/2"
    g = groups.get(spec.scheme)
    if g and spec.k % g:
        return False, f"K={spec.k} is not a multiple of the group size {g}"
    if spec.out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"out_dtype {spec.out_dtype} unsupported"
    return _triton_ok(torch.device(spec.device))


def can_implement_fp8(spec: LinearSpec) -> tuple[bool, str]:
    if spec.scheme != "fp8":
        return False, f"scheme {spec.scheme!r} is not fp8"
    return can_implement_scaled_mm(0, spec.n, spec.k, torch.device(spec.device))


def can_implement(spec: LinearSpec) -> tuple[bool, str]:
    """Whether a fast kernel (not the reference) runs ``spec``, and if not, why."""
    return can_implement_fp8(spec) if spec.scheme == "fp8" else can_implement_w4a8(spec)


def make_linear(
    spec: LinearSpec, weight: Union[W4A8Weight, Fp8Weight], bias: Optional[torch.Tensor] = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Returns (f, name): f(x [M, K]) -> [M, N]; name says which path was chosen."""
    ok, reason = can_implement(spec)
    if spec.scheme == "fp8":
        assert isinstance(weight, Fp8Weight)
        if ok:
            return (lambda x: fp8_linear(x, weight, bias)), "torch._scaled_mm"
        return (lambda x: fp8_linear_reference(x, weight, bias)), f"reference ({reason})"

    assert isinstance(weight, W4A8Weight)
    if ok:
        from .rmsnorm_quant import quantize_per_token
        from .w4a8_gemm import w4a8_gemm

        def f(x: torch.Tensor) -> torch.Tensor:
            xq, xs, xsum = quantize_per_token(x)
            return w4a8_gemm(xq, xs, weight, xsum, bias, spec.out_dtype)

        return f, "triton w4a8_gemm"

    from .rmsnorm_quant import rmsnorm_quant_reference
    from .w4a8_gemm import w4a8_gemm_reference

    def ref(x: torch.Tensor) -> torch.Tensor:
        xq, xs, _ = rmsnorm_quant_reference(x, None)
        return w4a8_gemm_reference(xq, xs, weight, bias, spec.out_dtype)

    return ref, f"reference ({reason})"
