"""Runtime linears and the small fused ops, each bound once to its device path.

A model is built once and then called thousands of times, so every choice (kernel or reference,
config, dummy pointers, shape checks) is made here at construction, and a call is the launch
alone: the Triton kernels on CUDA, the pure-torch references elsewhere (bit-compatible with the
kernels' definitions, so the CPU engine is the reference the GPU engine is tested against).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from natix.engines.natix.spec import EngineLoadError
from natix.engines.natix.weights import LinearWeights

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


class Ops:
    """Norm, activation and quantization for one device (kernels on CUDA, references else)."""

    def __init__(self, device: torch.device) -> None:
        self.gpu = on_gpu(device)
        self._launchers: dict[int, Any] = {}

    def add_rmsnorm(self, h: torch.Tensor, delta: Optional[torch.Tensor], w: torch.Tensor, eps: float,
                    quant: bool) -> Any:
        if self.gpu:
            from natix.kernels.fused_norm import add_rmsnorm_triton

            return add_rmsnorm_triton(h, delta, w, eps, quant, check=False)
        from natix.kernels.fused_norm import add_rmsnorm_reference

        return add_rmsnorm_reference(h, delta, w, eps, quant)

    def silu_mul(self, gu: torch.Tensor, quant: bool) -> Any:
        if self.gpu:
            from natix.kernels.activation import silu_mul_triton

            return silu_mul_triton(gu, quant, check=False)
        from natix.kernels.activation import silu_mul_reference

        return silu_mul_reference(gu, quant)

    def quantize(self, x: torch.Tensor) -> Quantized:
        """Per-token INT8 (`natix.kernels.rmsnorm_quant`'s kernel without the norm), lean launch."""
        if not self.gpu:
            from natix.kernels.rmsnorm_quant import rmsnorm_quant_reference

            return rmsnorm_quant_reference(x, None)
        m, h = x.shape
        q = torch.empty((m, h), dtype=torch.int8, device=x.device)
        s = torch.empty((m,), dtype=torch.float32, device=x.device)
        sm = torch.empty((m,), dtype=torch.int32, device=x.device)
        if m:
            self._quant_launcher(h)((m,), x, x, q, s, sm, h, x.stride(0), q.stride(0), 0.0)
        return q, s, sm

    def _quant_launcher(self, h: int) -> Any:
        """A `natix.kernels.launch.Launcher` of the quantization kernel for rows of ``h``."""
        lau = self._launchers.get(h)
        if lau is None:
            import triton

            from natix.kernels.launch import Launcher
            from natix.kernels.rmsnorm_quant import _kernel

            block = triton.next_power_of_2(h)
            lau = Launcher(_kernel(), NORM=False, BLOCK=block, num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16))
            self._launchers[h] = lau
        return lau


class Linear:
    """``y [M, N] = x [M, K] @ W^T + b``; W4A8 linears also take already-quantized input
    (:meth:`quantized`), which is how the fused norm / activation kernels feed them."""

    takes_int8 = False

    def __init__(self, lw: LinearWeights, ops: Ops, dtype: torch.dtype, name: str) -> None:
        self.n, self.k, self.name = lw.n, lw.k, name
        self.ops, self.dtype = ops, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantized(self, q: Quantized) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class DenseLinear(Linear):
    def __init__(self, lw: LinearWeights, ops: Ops, dtype: torch.dtype, name: str) -> None:
        super().__init__(lw, ops, dtype, name)
        self.weight, self.bias = lw.weight, lw.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class Fp8Linear(Linear):
    """Dynamic per-token e4m3 activations x per-channel e4m3 weights (torch._scaled_mm on CUDA)."""

    def __init__(self, lw: LinearWeights, ops: Ops, dtype: torch.dtype, name: str) -> None:
        super().__init__(lw, ops, dtype, name)
        from natix.kernels.fp8_linear import can_implement_scaled_mm

        self.w = lw.weight
        self.bias = lw.bias
        if ops.gpu:
            ok, why = can_implement_scaled_mm(0, lw.n, lw.k, lw.weight.weight.device)
            if not ok:
                raise EngineLoadError(f"{name}: fp8 linear [{lw.n}, {lw.k}] cannot run on this device: {why}")
            self.wt = lw.weight.weight.t()
            self.scale_b = lw.weight.weight_scale.view(1, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from natix.kernels.fp8_linear import fp8_linear_reference, quantize_fp8_per_token

        if not self.ops.gpu:
            return fp8_linear_reference(x, self.w, self.bias)
        xq, xs = quantize_fp8_per_token(x)
        return torch._scaled_mm(xq, self.wt, scale_a=xs, scale_b=self.scale_b, out_dtype=x.dtype, bias=self.bias)


class W4A8Linear(Linear):
    takes_int8 = True

    def __init__(self, lw: LinearWeights, ops: Ops, dtype: torch.dtype, name: str) -> None:
        super().__init__(lw, ops, dtype, name)
        from natix.kernels.w4a8_launch import W4A8Gemm

        try:
            self.gemm = W4A8Gemm(lw.weight, lw.bias, out_dtype=dtype, use_triton=ops.gpu)
        except ValueError as e:
            raise EngineLoadError(f"{name}: the W4A8 kernel cannot take this layer: {e}") from e

    def quantized(self, q: Quantized) -> torch.Tensor:
        return self.gemm(*q)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(*self.ops.quantize(x))


def make_linear(lw: LinearWeights, ops: Ops, dtype: torch.dtype, name: str) -> Linear:
    cls = {"dense": DenseLinear, "fp8": Fp8Linear, "w4a8": W4A8Linear}[lw.kind]
    return cls(lw, ops, dtype, name)


class VocabTables:
    """The embedding lookup and the lm_head GEMM over :class:`~natix.engines.natix.weights.ModelWeights`'
    ``embed`` / ``lm_head``: dense tensors in the model dtype, or ``Int8Rows``.

    Int8 rows on CUDA stay 8-bit in memory: the embedding is a gather of int8 rows times their float32
    scales (`natix.kernels.w8a16_linear.int8_rows_embedding`, the reference's own ops), lm_head the
    Triton W8A16 GEMM (weight-only, dequantized in registers). Elsewhere they are dequantized once here:
    the embedding table to the model dtype (the same numbers as gather-then-scale), lm_head to a float32
    weight multiplied in float32 (`w8a16_linear_reference`, the definition)."""

    def __init__(self, embed: Any, lm_head: Any, ops: Ops, dtype: torch.dtype) -> None:
        from natix.engines.natix.weights import Int8Rows

        self.ops, self.dtype = ops, dtype
        self.embed_int8 = isinstance(embed, Int8Rows)
        self.head_int8 = isinstance(lm_head, Int8Rows)
        self.embed = embed.dequantized(dtype) if self.embed_int8 and not ops.gpu else embed
        self.lm_head: Any = lm_head
        self.head_f32: Optional[torch.Tensor] = None
        self._head_launch: dict[tuple, Any] = {}
        if self.head_int8:
            if ops.gpu:
                from natix.kernels.w8a16_linear import _check

                probe = torch.empty((0, lm_head.shape[1]), dtype=dtype, device=lm_head.device)
                try:
                    _check(probe, lm_head.qweight, lm_head.scale, None)
                except ValueError as e:
                    raise EngineLoadError(f"lm_head: the W8A16 kernel cannot take it: {e}") from e
            else:
                self.head_f32 = lm_head.dequantized(torch.float32)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_int8 and self.ops.gpu:
            from natix.kernels.w8a16_linear import int8_rows_embedding

            return int8_rows_embedding(ids, self.embed.qweight, self.embed.scale, self.dtype)
        return torch.nn.functional.embedding(ids, self.embed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.head_int8:
            return torch.nn.functional.linear(x, self.lm_head)
        if not self.ops.gpu:
            from natix.kernels.w8a16_linear import w8a16_linear_reference

            return w8a16_linear_reference(x, self.lm_head.qweight, self.lm_head.scale, weight=self.head_f32)
        return self._w8a16(x.contiguous())

    def _w8a16(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton W8A16 GEMM through lean launchers (one per tile config, cached per lm_head)."""
        from natix.kernels.w8a16_linear import w8a16_linear

        return w8a16_linear(x, self.lm_head.qweight, self.lm_head.scale, check=False, launchers=self._head_launch)
