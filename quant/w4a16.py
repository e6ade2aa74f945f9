"""W4A16 (GPTQ) in compressed-tensors ``pack-quantized`` layout: the grid and the reference linear.

What vLLM's ``CompressedTensorsWNA16`` loads for one Linear with weight ``W [N, K]`` (out, in),
``G = K // group_size`` groups (``G = 1`` per output channel):

- ``weight_packed`` int32 ``[N, ceil(K/8)]``: eight 4-bit codes per int32 along K, code ``k`` of a
  word in bits ``4k..4k+3``. Codes are *signed* ``q ∈ [-8, 7]`` (compressed-tensors' INT4 range,
  ``calculate_range``) and are stored offset by +8 (``pack_to_int32``): vLLM reads them as
  ``uint4b8``.
- ``weight_scale`` ``[N, G]`` float (16-bit in the artifact; the model's dtype in vLLM).
- ``weight_zero_point`` (asymmetric only) int32 ``[ceil(N/8), G]``: signed zero points in
  ``[-8, 7]`` packed the same way but along N (``packed_dim=0``); vLLM reads them as ``uint4``.
- ``weight_shape`` int64 ``[2]`` = ``(N, K)``.
- ``weight_g_idx`` int32 ``[K]`` (only with ``actorder="group"``): the group of every input column.
- ``W ≈ (q − zero) · scale[:, g_idx]`` — compressed-tensors' ``dequantize``.

Grid (compressed-tensors' ``calculate_qparams`` convention, with the scale rounded to its storage
dtype *before* the codes are chosen, so GPTQ optimises exactly the weight the engine serves):

- symmetric: ``scale = absmax / 7.5`` (range ``[-8, 7]``, half-width 7.5), ``zero = 0``;
- asymmetric: ``scale = (max − min) / 15`` over a range that contains 0, ``zero = round(−8 − min /
  scale)`` clamped to ``[-8, 7]``; ``q = clamp(round(w / scale + zero), −8, 7)``.

Packing and unpacking use compressed-tensors' own helpers (imported lazily: the library is only
needed once a layer is packed or run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from natix.quant.errors import QuantError
from natix.quant.gptq import GptqError, GptqResult, gptq_quantize, rtn_quantize

NUM_BITS = 4
PACK_FACTOR = 32 // NUM_BITS
ACTORDERS = (None, "group", "weight")
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

__all__ = ["ACTORDERS", "CtIntGrid", "NUM_BITS", "W4A16Linear", "as_scale_dtype", "pack_codes",
           "unpack_codes"]


def as_scale_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"float16"`` / ``"float32"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in SCALE_DTYPES.values():
            raise QuantError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {name}")
        return name
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise QuantError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {name!r}") from None


def _ct_helpers():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError as e:
        raise QuantError("the gptq scheme packs weights with the compressed-tensors package: "
                         f"pip install 'compressed-tensors==0.17.0' ({e})") from e
    return pack_to_int32, unpack_from_int32


def pack_codes(codes: torch.Tensor, packed_dim: int = 1) -> torch.Tensor:
    """Signed 4-bit codes ``[R, C]`` (any int dtype, values in [-8, 7]) -> int32, eight per word
    along ``packed_dim`` (1: ``[R, ceil(C/8)]`` as ``weight_packed``; 0: ``[ceil(R/8), C]`` as
    ``weight_zero_point``)."""
    pack_to_int32, _ = _ct_helpers()
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise AssertionError("4-bit codes outside [-8, 7]")
    return pack_to_int32(codes.to(torch.int8), NUM_BITS, packed_dim=packed_dim)


def unpack_codes(packed: torch.Tensor, shape: tuple[int, int], packed_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes ``shape`` in [-8, 7]."""
    _, unpack_from_int32 = _ct_helpers()
    return unpack_from_int32(packed, NUM_BITS, torch.Size(shape), packed_dim=packed_dim)


# --------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class CtIntGrid:
    """compressed-tensors' signed INT``bits`` grid for :func:`natix.quant.gptq.gptq_quantize`.

    Codes are in ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, ``w ≈ scale · (q − zero)``. ``fit``
    returns the scale already rounded to ``storage`` (the dtype ``weight_scale`` is written in),
    as float32 values, so the codes GPTQ picks — and its error feedback — use the served scale.
    """

    bits: int = NUM_BITS
    symmetric: bool = True
    storage: torch.dtype = torch.bfloat16

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def check(self, shape: tuple[int, int], group_size: int) -> None:
        if not 2 <= self.bits <= 8:
            raise GptqError(f"CtIntGrid supports 2..8 bits, got {self.bits}")

    def prepare(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def round_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """float32 scale -> the nearest ``storage`` value (as float32), floored at its smallest
        normal so an all-zero group does not divide by zero (its codes are then exactly 0)."""
        rounded = scale.to(self.storage).float()
        if not torch.isfinite(rounded).all():
            raise GptqError(f"a quantization scale overflows {self.storage} (weights too large to store)")
        return rounded.clamp_min(torch.finfo(self.storage).tiny)

    def fit(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # the range always contains 0 (compressed-tensors does the same): zero weights stay exact
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        steps = float(self.qmax - self.qmin)
        if self.symmetric:
            scale = self.round_scale(torch.maximum(-lo, hi) / (steps / 2))
            return scale, torch.zeros_like(scale)
        scale = self.round_scale((hi - lo) / steps)
        zero = torch.round(self.qmin - lo / scale).clamp(self.qmin, self.qmax)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 channel: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.round(w / scale + zero).clamp(self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   channel: Optional[torch.Tensor]) -> torch.Tensor:
        # (small integer) × (16-bit scale) is exact in float32, so any evaluation order agrees
        return (codes - zero) * scale


# ------------------------------------------------------------------------------------------- module


class W4A16Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding a compressed-tensors ``pack-quantized`` INT4 weight
    (state dict: see the module docstring; exactly the tensors vLLM's WNA16 loader creates).

    ``forward`` dequantizes ``W = (q − zero) · scale`` exactly in float32, rounds it once to the
    activation dtype (what the engine's kernels multiply with) and multiplies — in float32 on CPU.
    The dequantized weight is cached per (dtype, device) until a stored tensor changes, so this
    reference costs about the memory of an unquantized layer; it is for checking, not speed.

    ``model.to(dtype)`` / ``.float()`` never change ``weight_scale``'s dtype (the codes were chosen
    against the scale as stored) nor the integer tensors'; ``bias`` follows the model dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 actorder: str | None = None, symmetric: bool = True, dtype: torch.dtype = torch.float32,
                 scale_dtype: torch.dtype | str = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if actorder not in ACTORDERS:
            raise QuantError(f"actorder must be one of {ACTORDERS}, got {actorder!r}")
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise QuantError(f"group_size {group_size} does not divide in_features {in_features} "
                             "(use -1 for per output channel)")
        if actorder == "group" and group_size == -1:
            raise QuantError("actorder 'group' needs groups (group_size > 0); per channel there is one group")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.actorder, self.symmetric = group_size, actorder, symmetric
        n, k = out_features, in_features
        groups = 1 if group_size == -1 else k // group_size
        i32 = dict(dtype=torch.int32, device=device)
        self.weight_packed = nn.Parameter(torch.zeros(n, -(-k // PACK_FACTOR), **i32), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(n, groups, dtype=as_scale_dtype(scale_dtype), device=device),
                                         requires_grad=False)
        if not symmetric:
            self.weight_zero_point = nn.Parameter(torch.zeros(-(-n // PACK_FACTOR), groups, **i32),
                                                  requires_grad=False)
        else:
            self.weight_zero_point = None
        self.weight_shape = nn.Parameter(torch.tensor([n, k], dtype=torch.int64, device=device),
                                         requires_grad=False)
        if actorder == "group":
            self.weight_g_idx = nn.Parameter(torch.arange(k, device=device, dtype=torch.int32) // group_size,
                                             requires_grad=False)
        else:
            self.weight_g_idx = None
        self.bias = (nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_gptq_result(cls, result: GptqResult, *, bias: torch.Tensor | None = None, symmetric: bool = True,
                         actorder: str | None = None, scale_dtype: torch.dtype | str = torch.bfloat16,
                         dtype: torch.dtype | None = None) -> "W4A16Linear":
        """Pack a :class:`GptqResult` made with ``CtIntGrid(symmetric=..., storage=scale_dtype)``.

        ``actorder="group"`` stores ``result.g_idx`` (GPTQ desc_act groups); otherwise the groups
        must be contiguous (no act-order, or act-order with static groups = ``"weight"``)."""
        n, k = result.codes.shape
        gs = result.group_size
        sdt = as_scale_dtype(scale_dtype)
        mod = cls(k, n, bias=bias is not None, group_size=gs, actorder=actorder, symmetric=symmetric,
                  dtype=dtype or (bias.dtype if bias is not None else torch.float32), scale_dtype=sdt,
                  device=result.codes.device)
        scale = result.scale.to(sdt)
        if not torch.equal(scale.float(), result.scale.float()):
            raise QuantError(f"weight {(n, k)}: scales are not representable in {sdt}; quantize with "
                             f"CtIntGrid(storage={sdt})")
        mod.weight_packed.data = pack_codes(result.codes)
        mod.weight_scale.data = scale
        if symmetric:
            if bool((result.zero != 0).any()):
                raise QuantError(f"weight {(n, k)}: symmetric layout needs zero points of 0")
        else:
            mod.weight_zero_point.data = pack_codes(result.zero.round().to(torch.int32), packed_dim=0)
        contiguous = torch.arange(k, device=result.g_idx.device) // (k if gs == -1 else gs)
        if actorder == "group":
            mod.weight_g_idx.data = result.g_idx.to(torch.int32)
        elif not torch.equal(result.g_idx, contiguous):
            raise QuantError(f"weight {(n, k)}: groups are permuted (GPTQ act-order without static groups); "
                             "store them with actorder='group'")
        if bias is not None:
            mod.bias.data = bias.detach().clone()
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 128, actorder: str | None = None,
                    symmetric: bool = True, scale_dtype: torch.dtype | str = torch.bfloat16,
                    hessian: torch.Tensor | None = None, percdamp: float = 0.01,
                    block_size: int = 128) -> "W4A16Linear":
        """GPTQ with ``hessian [K, K]`` (act-order per ``actorder``), or round-to-nearest without."""
        sdt = as_scale_dtype(scale_dtype)
        grid = CtIntGrid(bits=NUM_BITS, symmetric=symmetric, storage=sdt)
        w = linear.weight.detach()
        if hessian is None:
            res = rtn_quantize(w, grid, group_size=group_size)
        else:
            res = gptq_quantize(w, hessian, grid, block_size=block_size, percdamp=percdamp,
                                act_order=actorder is not None, group_size=group_size,
                                static_groups=actorder == "weight")
        return cls.from_gptq_result(res, bias=linear.bias, symmetric=symmetric, actorder=actorder,
                                    scale_dtype=sdt, dtype=linear.weight.dtype)

    def layer_meta(self) -> dict:
        return {"group_size": self.group_size, "actorder": self.actorder, "symmetric": self.symmetric}

    # -------------------------------------------------------------------------------- math
    def codes(self) -> torch.Tensor:
        """int8 ``[N, K]`` signed codes (compressed-tensors' unpacking)."""
        return unpack_codes(self.weight_packed, (self.out_features, self.in_features))

    def zero_points(self) -> torch.Tensor:
        """int8 ``[N, G]`` signed zero points (zeros when symmetric)."""
        n, g = self.weight_scale.shape
        if self.weight_zero_point is None:
            return torch.zeros(n, g, dtype=torch.int8, device=self.weight_scale.device)
        return unpack_codes(self.weight_zero_point, (n, g), packed_dim=0)

    def g_idx(self) -> torch.Tensor:
        """int64 ``[K]``: the group of every input column."""
        if self.weight_g_idx is not None:
            return self.weight_g_idx.long()
        gs = self.in_features if self.group_size == -1 else self.group_size
        return torch.arange(self.in_features, device=self.weight_packed.device) // gs

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``[N, K]`` = ``(q − zero) · scale`` per column's group (exact)."""
        g = self.g_idx()
        zero = self.zero_points().float()[:, g]
        return (self.codes().float() - zero) * self.weight_scale.float()[:, g]

    def _weight_for(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensors = [t for t in (self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_g_idx)
                   if t is not None]
        key = (dtype, device, tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dequantized_weight().to(device=device, dtype=dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise QuantError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        w = self._weight_for(x.dtype, x.device)
        if x.device.type == "cpu" and x.dtype != torch.float32:
            b = self.bias.float() if self.bias is not None else None
            return nn.functional.linear(x.float(), w.float(), b).to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, w, b)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fixed = {id(t) for t in (self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_shape,
                                 self.weight_g_idx) if t is not None}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if id(t) not in fixed or out.dtype == t.dtype else t.to(out.device)

        self._cache = None
        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 {g} {'sym' if self.symmetric else 'asym'}, actorder={self.actorder}, "
                f"scale={self.weight_scale.dtype}")
