"""``W4A8Linear``: the reference module of the QServe W4A8 linear (UINT4 weights, INT8 activations).

State dict (one layer, weight ``W [N, K]`` = [out_features, in_features]) — exactly the packed
format of :mod:`natix.kernels.packing`, which is its definition:

==================  ========  =============  ====================================================
name                dtype     shape          meaning
==================  ========  =============  ====================================================
``qweight``         uint8     [N // 2, K]    two UINT4 codes per byte: rows ``j`` (low nibble) and
                                             ``j + N/2`` (high nibble)
``scale``           float32   [N]            level-0 per-output-channel scale
``group_scale``     uint8     [K // G, N]    progressive only: level-1 integer scale ``s1``
``group_zero``      uint8     [K // G, N]    progressive only: level-1 scaled zero ``z * s1``
``zero``            uint8     [N]            per-channel only: UINT4 zero point
``bias``            model     [N]            optional; follows the model dtype
==================  ========  =============  ====================================================

Forward: ``x [..., K]`` is quantized per token, symmetric INT8 (``natix.kernels.rmsnorm_quant``'s
``quantize_per_token``), then multiplied in integers by the W4A8 GEMM: the Triton kernel on CUDA
where ``natix.kernels.select.can_implement`` allows it, else ``w4a8_gemm_reference`` (int64 matmul,
fp32 epilogue). On CPU the module's output *is* the kernels' reference, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from natix.kernels.packing import (GROUP_SIZE, GROUP_SIZES, W4A8Weight, describe, pack_channel, quantize_channel,
                                   quantize_progressive)
from natix.quant.errors import QuantError

if TYPE_CHECKING:
    from natix.quant.gptq import GptqResult, Grid

__all__ = ["W4A8Linear"]


def _check_group(in_features: int, out_features: int, group_size: int) -> None:
    if out_features % 2:
        raise QuantError(f"W4A8 needs an even out_features (the packed format stores rows j and j + N/2 in one "
                         f"byte), got Linear({in_features}, {out_features})")
    if isinstance(group_size, bool) or group_size not in (*GROUP_SIZES, -1):
        raise QuantError(f"W4A8 group_size must be one of {GROUP_SIZES} (progressive) or -1 (per channel), "
                         f"got {group_size!r}")
    if group_size > 0 and in_features % group_size:
        fits = [g for g in reversed(GROUP_SIZES) if in_features % g == 0]
        hint = f"group_size={fits[0]} divides it, or " if fits else ""
        raise QuantError(f"W4A8 g{group_size} needs in_features % {group_size} == 0, got Linear({in_features}, "
                         f"{out_features}); {hint}group_size=-1 (per channel)")


class W4A8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding a packed W4A8 weight.

    ``group_size``: 128, 64 or 32 (QoQ progressive in groups of that many input channels, needs
    ``K % group_size == 0``) or -1 (per-channel UINT4).
    ``out_features`` must be even (the format pairs rows ``j`` and ``j + N/2`` in one byte).
    ``model.to(dtype)`` never changes ``scale`` (fp32) or the uint8 buffers: a cast would change the
    numbers the kernel reads. ``bias`` follows the model dtype like any other parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_group(in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n, k = out_features, in_features
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("qweight", torch.zeros(n // 2, k, **u8))
        self.register_buffer("scale", torch.ones(n, dtype=torch.float32, device=device))
        if group_size > 0:
            self.register_buffer("group_scale", torch.ones(k // group_size, n, **u8))
            self.register_buffer("group_zero", torch.zeros(k // group_size, n, **u8))
        else:
            self.register_buffer("zero", torch.zeros(n, **u8))
        self.bias = (nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_packed(cls, w: W4A8Weight, bias: torch.Tensor | None = None) -> "W4A8Linear":
        """Wrap a packed weight (``w.validate()`` is run) and an optional ``bias [N]``."""
        w.validate()
        gs = w.group_size or -1
        mod = cls(w.k, w.n, bias=bias is not None, group_size=gs,
                  dtype=bias.dtype if bias is not None else torch.float32, device=w.qweight.device)
        mod.qweight.copy_(w.qweight)
        mod.scale.copy_(w.scale)
        if gs > 0:
            mod.group_scale.copy_(w.group_scale)
            mod.group_zero.copy_(w.group_zero)
        else:
            mod.zero.copy_(w.zero)
        if bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    @classmethod
    def from_gptq(cls, result: "GptqResult", grid: "Grid", bias: torch.Tensor | None = None) -> "W4A8Linear":
        """From a :func:`natix.quant.gptq.gptq_quantize` result: ``ProgressiveGrid`` (grouped) or a
        4-bit asymmetric ``AffineGrid`` with ``group_size=-1`` (per channel)."""
        from natix.quant.gptq import AffineGrid, ProgressiveGrid

        n, k = result.codes.shape
        if n % 2:
            raise QuantError(f"W4A8 needs an even N (out features), got weight {(n, k)}")
        if isinstance(grid, ProgressiveGrid):
            return cls.from_packed(grid.pack(result), bias)
        if isinstance(grid, AffineGrid) and grid.bits == 4 and not grid.symmetric and result.group_size == -1:
            w = pack_channel(result.codes.to(torch.uint8), result.zero[:, 0].to(torch.uint8), result.scale[:, 0])
            return cls.from_packed(w, bias)
        raise QuantError(f"weight {(n, k)}: W4A8 takes ProgressiveGrid (grouped) or AffineGrid(bits=4, asymmetric) "
                         f"per channel (group_size=-1), got {grid!r} with group_size={result.group_size}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE) -> "W4A8Linear":
        """Round-to-nearest quantization of ``linear`` (no calibration)."""
        _check_group(linear.in_features, linear.out_features, group_size)
        w = linear.weight.detach()
        packed = quantize_progressive(w, group_size) if group_size > 0 else quantize_channel(w)
        return cls.from_packed(packed, linear.bias)

    # -------------------------------------------------------------------------------- behaviour
    def packed(self) -> W4A8Weight:
        """The buffers as the kernels' :class:`W4A8Weight` (views, no copy)."""
        if self.group_size > 0:
            return W4A8Weight(self.qweight, self.scale, group_scale=self.group_scale, group_zero=self.group_zero)
        return W4A8Weight(self.qweight, self.scale, zero=self.zero)

    def layer_meta(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` (fp16/bf16/fp32) -> ``[..., N]`` in ``x.dtype``. CUDA: the Triton ops where
        they can take the shape; elsewhere the pure-torch references, called directly (the ops
        route CPU tensors to the Triton interpreter when TRITON_INTERPRET=1, which is for testing
        the kernels, not for running a model)."""
        from natix.kernels.rmsnorm_quant import quantize_per_token, rmsnorm_quant_reference
        from natix.kernels.w4a8_gemm import w4a8_gemm_reference

        assert x.shape[-1] == self.in_features, f"x has K={x.shape[-1]}, layer has K={self.in_features}"
        x2 = x.reshape(-1, self.in_features).contiguous()
        w = self.packed()
        if x.is_cuda and self._kernel_ok(x):
            from natix.kernels.w4a8_gemm import w4a8_gemm

            xq, xs, xsum = quantize_per_token(x2)
            y = w4a8_gemm(xq, xs, w, xsum, self.bias, x.dtype)
        else:
            xq, xs, _ = rmsnorm_quant_reference(x2, None)
            y = w4a8_gemm_reference(xq, xs, w, self.bias, out_dtype=x.dtype, wi=self._integer_weight(w))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _integer_weight(self, w: W4A8Weight) -> torch.Tensor:
        """int8 [N, K] integer weight of the reference GEMM, kept until a buffer changes (unpacking
        it on every call cost more than the matmul in decode)."""
        from natix.kernels.packing import integer_weight

        key = tuple((t.data_ptr(), t._version) for t in (w.qweight, w.group_scale, w.group_zero, w.zero)
                    if t is not None)
        if getattr(self, "_wi_key", None) != key:
            self._wi = integer_weight(w).to(torch.int8)  # values in [-128, 127] (packing checks it)
            self._wi_key = key
        return self._wi

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        from natix.kernels.select import LinearSpec, can_implement

        scheme = f"w4a8_g{self.group_size}" if self.group_size > 0 else "w4a8_channel"
        ok, _ = can_implement(LinearSpec(scheme, self.out_features, self.in_features, str(x.device), x.dtype))
        # the kernel reads qweight rows as int32 words, which can_implement does not check
        return ok and self.in_features % 4 == 0

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {id(self.scale)}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if id(t) not in fixed or out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        g = f"{describe(self.group_size)} progressive" if self.group_size > 0 else "per channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=uint4 {g}, act=int8/token dynamic")
