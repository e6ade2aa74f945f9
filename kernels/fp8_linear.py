"""FP8 (e4m3) linear: dynamic per-token activation scales x per-channel weight scales, through
``torch._scaled_mm`` (cuBLASLt row-wise scaling on Hopper). No hand-written GEMM.

Weight format: ``weight`` float8_e4m3fn [N, K] (K contiguous), ``weight_scale`` float32 [N]
(``W ~= weight_scale[n] * weight[n, :]``). cuBLASLt wants K % 16 == 0 and N % 16 == 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
#: per-token scale floor, as vLLM's dynamic per-token FP8 quantization (1 / (448 * 512)): an
#: all-zero row gets a finite scale instead of a division by zero
MIN_TOKEN_SCALE = 1.0 / (FP8_MAX * 512.0)


@dataclass(frozen=True)
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    weight_scale: torch.Tensor  # float32 [N]

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def k(self) -> int:
        return self.weight.shape[1]


def quantize_fp8_weight(w: torch.Tensor) -> Fp8Weight:
    """float [N, K] -> per-channel FP8."""
    s = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return Fp8Weight((w.float() / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), s.contiguous())


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8 [..., K], float32 scale [..., 1]), one scale per row."""
    s = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_TOKEN_SCALE)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def fp8_linear_reference(x: torch.Tensor, w: Fp8Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[M, N] in x.dtype: dequantized FP8 activations @ dequantized weights^T, float32."""
    xq, xs = quantize_fp8_per_token(x)
    y = (xq.float() * xs) @ (w.weight.float() * w.weight_scale[:, None]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def can_implement_scaled_mm(m: int, n: int, k: int, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "torch._scaled_mm row-wise FP8 needs CUDA (reference on CPU)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False, "FP8 tensor cores need compute capability >= 8.9"
    if k % 16 or n % 16:
        return False, f"cuBLASLt FP8 needs K and N multiples of 16 (K={k}, N={n})"
    return True, "ok"


def _check(x, weight, weight_scale, bias) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16/bf16 [M, K], got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != FP8 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be float8_e4m3fn [N, {x.shape[1]}]")
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (weight.shape[0],):
        raise ValueError(f"weight_scale must be float32 [{weight.shape[0]}]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}]")


@torch.library.custom_op("natix::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    _check(x, weight, weight_scale, bias)
    ok, _ = can_implement_scaled_mm(x.shape[0], weight.shape[0], weight.shape[1], x.device)
    if not ok:
        return fp8_linear_reference(x, Fp8Weight(weight, weight_scale), bias)
    xq, xs = quantize_fp8_per_token(x)
    # row-wise scaled_mm takes bf16 bias only with bf16 output
    return torch._scaled_mm(
        xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1), out_dtype=x.dtype,
        bias=bias.to(x.dtype) if bias is not None else None,
    )


@_fp8_linear_op.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 -> [M, N] in x.dtype, dynamic per-token FP8 activations."""
    return torch.ops.natix.fp8_linear(x, w.weight, w.weight_scale, bias)
