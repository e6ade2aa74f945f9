"""FP8 (e4m3) quantization math and the reference ``Fp8Linear``: what the serving kernel computes.

Layout (compressed-tensors ``float-quantized``, as vLLM and SGLang load it):

- weight ``[N, K]`` float8_e4m3fn, scaled per output channel: ``weight_scale`` fp32 ``[N, 1]``,
  ``W ≈ weight.float() * weight_scale``; ``scale = amax(|W[n, :]|) / 448``.
- activations are quantized on the fly, per token (row): ``scale_x = max(amax(|x|) / 448,
  1 / (448 * 512))`` fp32 ``[..., 1]`` — the lower bound is vLLM's
  ``dynamic_per_token_scaled_fp8_quant`` floor, so all-zero rows do not divide by zero.
- ``y = (x_q * scale_x) @ (W_q * scale_w)^T + bias`` accumulated in fp32, cast to ``x``'s dtype
  (the kernels accumulate in fp32 and apply both scales in the epilogue: the same product).

Values are divided by the scale, clamped to ±448 (e4m3 has no inf; out-of-range casts give NaN)
and cast with round-to-nearest-even. Relative error of one e4m3 rounding is ≤ 2^-4 (3 mantissa
bits); on Gaussian weights the per-tensor RMS relative error is ~2.5-3%.
"""

from __future__ import annotations

import torch
from torch import nn

from natix.kernels.fp8_linear import FP8 as FP8_DTYPE
from natix.kernels.fp8_linear import FP8_MAX, MIN_TOKEN_SCALE, Fp8Weight, fp8_linear_reference, quantize_fp8_weight
from natix.kernels.fp8_linear import fp8_linear as fp8_linear_kernel
from natix.kernels.fp8_linear import quantize_fp8_per_token as quantize_activation_per_token

__all__ = ["FP8_DTYPE", "FP8_MAX", "MIN_TOKEN_SCALE", "Fp8Linear", "dequantize", "fp8_linear",
           "quantize_activation_per_token", "quantize_weight_per_channel"]


def quantize_weight_per_channel(weight: torch.Tensor, scale: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (any float dtype) -> (``q [N, K]`` e4m3, ``scale [N, 1]`` fp32).

    ``scale`` None: absmax per channel, natix.kernels' math (one definition for the exporter, the
    reference and the kernel). Else the given per-channel scale (``[N]`` or ``[N, 1]``, e.g. from
    :func:`search_weight_scale`): values beyond ``±448·scale`` clip. The scale is shaped ``[N, 1]``
    as compressed-tensors stores it."""
    assert weight.dim() == 2, f"expected a 2-D weight, got shape {tuple(weight.shape)}"
    if scale is None:
        fw = quantize_fp8_weight(weight.detach())
        return fw.weight, fw.weight_scale[:, None]
    s = scale.detach().float().reshape(-1, 1).to(weight.device)
    assert s.shape[0] == weight.shape[0], f"scale has {s.shape[0]} rows, weight {weight.shape[0]}"
    return _round_fp8(weight.detach().float(), s).contiguous(), s.contiguous()


def _round_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


#: clipping ratios :func:`search_weight_scale` tries (1.0 = absmax, so never worse than it): the grid of
#: llm-compressor's MSE observer (1% steps, at most 20% shrink). On SmolLM2-135M no channel chose a
#: ratio below 0.89 when the grid went down to 0.50.
CLIP_RATIOS = tuple(round(1.0 - i / 100, 2) for i in range(21))


def search_weight_scale(weight: torch.Tensor, weights: torch.Tensor | None = None,
                        ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per output channel, the e4m3 scale ``ratio·absmax/448`` (``ratio`` in ``ratios``, by default
    1.00, 0.99, ..., 0.80) minimizing
    ``Σ_k c_k (W[n,k] − Q(W)[n,k])²``: plain weight MSE when ``weights`` (``c [K]``) is None, else
    the output error ``E‖x·(w − q)‖²`` in the diagonal approximation when ``c_k = E[x_k²]`` over
    calibration inputs. ``weight [N, K]`` -> scale ``[N]`` fp32. Ties keep the larger ratio, so the
    result is absmax where clipping does not help."""
    w = weight.detach().float()
    c = None if weights is None else weights.detach().float().reshape(1, -1).to(w.device)
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    best_err = torch.full((w.shape[0], 1), float("inf"), device=w.device)
    best = amax.clone()
    for r in sorted(ratios, reverse=True):
        s = amax * r
        d = (w - _round_fp8(w, s).float() * s).square_()
        err = (d if c is None else d.mul_(c)).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.reshape(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (``scale`` broadcasts: ``[N, 1]`` or ``[..., 1]``)."""
    return q.float() * scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8-fp8 linear: ``x [..., K]``, ``weight [N, K]`` e4m3, ``weight_scale [N, 1]`` fp32,
    ``bias [N]`` -> ``[..., N]`` in ``x.dtype``. fp16/bf16 on CUDA goes through the kernel op
    (``torch._scaled_mm`` where it can implement the shape); everything else through the
    pure-torch reference, which computes the same product in fp32."""
    assert weight.dtype == FP8_DTYPE, f"weight must be {FP8_DTYPE}, got {weight.dtype}"
    assert weight_scale.shape == (weight.shape[0], 1), (
        f"weight_scale must be [{weight.shape[0]}, 1], got {tuple(weight_scale.shape)}")
    assert x.shape[-1] == weight.shape[1], f"x has K={x.shape[-1]}, weight has K={weight.shape[1]}"
    w = Fp8Weight(weight, weight_scale.float().reshape(-1))
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        y = fp8_linear_kernel(x2.contiguous(), w, bias)
    else:
        y = fp8_linear_reference(x2, w, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding an e4m3 weight + per-channel scale (state-dict keys
    ``weight``, ``weight_scale``, ``bias`` — the names vLLM's compressed-tensors loader expects).

    ``model.to(dtype)`` / ``model.float()`` move these tensors between devices but never change
    the dtype of ``weight`` (fp8) or ``weight_scale`` (fp32): an upcast would silently drop the
    scales' meaning. ``bias`` follows the model dtype like any other parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale: torch.Tensor | None = None) -> "Fp8Linear":
        """Round ``linear``'s weight to e4m3 with per-channel ``scale`` (``[N]``; None: absmax)."""
        q, scale = quantize_weight_per_channel(linear.weight, scale=scale)
        return cls.from_codes(linear, q, scale)

    @classmethod
    def from_codes(cls, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> "Fp8Linear":
        """The module for e4m3 ``q [N, K]`` and scale ``[N]`` / ``[N, 1]`` chosen for ``linear`` (its bias kept)."""
        assert q.dtype == FP8_DTYPE and q.shape == linear.weight.shape, (q.dtype, tuple(q.shape))
        scale = scale.detach().float().reshape(-1, 1).contiguous()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  dtype=linear.weight.dtype, device=linear.weight.device)
        mod.weight.data = q.contiguous()
        mod.weight_scale.data = scale
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    def layer_meta(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {id(self.weight), id(self.weight_scale)}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if id(t) not in fixed or out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=e4m3/channel, act=e4m3/token dynamic")
