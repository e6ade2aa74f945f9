"""8-bit reference modules for the vocabulary tensors: ``W8A16Linear`` (lm_head) and
``Int8Embedding`` (embed_tokens), w4a8kv4's ``lm_head_bits=8`` / ``embed_bits=8``.

State dict of both (one tensor ``W [V, D]``; the format of :mod:`natix.kernels.w8a16_linear`):

==============  ========  =======  ==============================================================
name            dtype     shape    meaning
==============  ========  =======  ==============================================================
``qweight``     int8      [V, D]   symmetric codes in [-127, 127]
``scale``       float32   [V]      one scale per row: per output channel (lm_head), per token
                                   (embedding); ``W[v] ~= scale[v] * qweight[v]``
``bias``        model     [V]      W8A16Linear only, optional
==============  ========  =======  ==============================================================

Forward (the definitions the engines are tested against): ``W8A16Linear`` is weight-only —
``x.float() @ dequant(W).T`` in float32, rounded to ``x.dtype`` (the Triton W8A16 GEMM on CUDA for
fp16/bf16 inputs); ``Int8Embedding`` gathers int8 rows and multiplies them by their scales, in
float32, rounded to the module's dtype. ``model.to(dtype)`` never changes ``scale`` or ``qweight``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from natix.kernels.w8a16_linear import (dequantize_int8_rows, int8_rows_embedding, quantize_int8_rows,
                                        w8a16_linear_reference)

__all__ = ["Int8Embedding", "W8A16Linear", "EMBEDDING_FORMAT", "LINEAR_FORMAT"]

from natix.quant.w4a8kv4_config import EMBEDDING_FORMAT, LINEAR_FORMAT  # their manifest records' "format"


class _Int8Rows(nn.Module):
    """Shared storage: ``qweight`` int8 [V, D] and ``scale`` float32 [V], kept in their dtypes."""

    def __init__(self, rows: int, cols: int, device: Any = None) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(rows, cols, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(rows, dtype=torch.float32, device=device))

    def load_rows(self, w: torch.Tensor) -> None:
        q, s = quantize_int8_rows(w)
        self.qweight.copy_(q)
        self.scale.copy_(s)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``dequant(W)`` [V, D] (float32 math, then ``dtype``)."""
        return dequantize_int8_rows(self.qweight, self.scale, dtype)

    def _dequantized_cached(self) -> torch.Tensor:
        """The float32 dequantized weight, kept until a buffer changes (the reference matmul needs it
        on every call; recomputing it cost more than the matmul on CPU)."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.qweight, self.scale))
        if getattr(self, "_deq_key", None) != key:
            self._deq = self.dequantized()
            self._deq_key = key
        return self._deq

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {id(self.scale)}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if id(t) not in fixed or out.dtype == t.dtype else t.to(out.device)

        self._deq_key = None
        self._deq = None
        return super()._apply(keep_dtype, recurse)


class W8A16Linear(_Int8Rows):
    """Drop-in for ``nn.Linear`` with an int8 per-output-channel weight; activations unquantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__(out_features, in_features, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A16Linear":
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                  device=w.device)
        mod.load_rows(w)
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    def layer_meta(self) -> dict[str, Any]:
        return {"format": LINEAR_FORMAT, "bits": 8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.in_features, f"x has K={x.shape[-1]}, layer has K={self.in_features}"
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from natix.kernels.w8a16_linear import w8a16_linear

            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = w8a16_linear(x2.contiguous(), self.qweight, self.scale, bias)
        else:
            y = w8a16_linear_reference(x2, self.qweight, self.scale, self.bias, weight=self._dequantized_cached())
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "weight=int8/channel, act=16-bit (weight-only)")


class Int8Embedding(_Int8Rows):
    """Drop-in for ``nn.Embedding`` (no padding_idx semantics beyond the lookup, no max_norm) with
    an int8 per-token table; outputs ``dtype`` (the model's; it follows ``model.to(dtype)``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__(num_embeddings, embedding_dim, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.out_dtype = dtype

    # the manifest's layer record reads [out_features, in_features]: [V, D] here, as for lm_head
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, dtype=w.dtype, device=w.device)
        mod.load_rows(w)
        return mod

    def layer_meta(self) -> dict[str, Any]:
        return {"format": EMBEDDING_FORMAT, "bits": 8}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return int8_rows_embedding(ids, self.qweight, self.scale, self.out_dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # follow model.to(dtype) / .half() / .float() for the output dtype, as nn.Embedding's weight would
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=int8/token, out={self.out_dtype}"
