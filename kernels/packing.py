"""The packed W4A8 weight format that `natix.kernels.w4a8_gemm` reads and the exporter writes.

Format (one linear layer, weight W of shape [N, K] = [out_features, in_features]):

==================  ==========  ================  ===================================================
tensor              dtype       shape             meaning
==================  ==========  ================  ===================================================
``qweight``         uint8       [N // 2, K]       two UINT4 codes per byte, split along N (see below)
``scale``           float32     [N]               per-output-channel scale (level 0)
``group_scale``     uint8       [K // G, N]       progressive only: level-1 integer scale ``s1``
``group_zero``      uint8       [K // G, N]       progressive only: level-1 *scaled* zero ``sz = z * s1``
``zero``            uint8       [N]               per-channel only: UINT4 zero point ``z``
==================  ==========  ================  ===================================================

Nibble order: byte ``qweight[j, k]`` holds ``q4[j, k]`` in its low nibble and ``q4[j + N//2, k]``
in its high nibble (codes 0..15). Splitting along N (not K) keeps the format free of any kernel
block size: a program that owns packed rows ``j0 .. j0+B`` computes output columns ``j0 .. j0+B``
and ``N//2 + j0 .. N//2 + j0+B`` from one activation tile, and no nibble interleave is needed in
registers. N must therefore be even. ``qweight`` rows are K-contiguous (the K-major B operand
that INT8 tensor cores want).

Dequantization (what the kernel computes, exactly, in integers):

- progressive (QServe QoQ) in groups of G = 128 (QServe's), 64 or 32 input channels:
  ``q8[n, k] = q4[n, k] * s1[k // G, n] - sz[k // G, n]`` (subtraction after multiplication), an
  INT8 value; the packer checks it lies in [-128, 127] (QServe clamps level 0 to [-119, 119] so it
  does). ``W[n, k] ~= scale[n] * q8[n, k]``. Requires K % G == 0; G is not stored, it is
  ``K // group_scale.shape[0]`` (so g128 artifacts written before G became a parameter read as
  before).
- per-channel: ``W[n, k] ~= scale[n] * (q4[n, k] - zero[n])``. The GEMM multiplies raw UINT4
  codes and subtracts ``x_sum[m] * zero[n]`` in the epilogue, with ``x_sum[m] = sum_k xq[m, k]``
  the per-token sum of INT8 activation codes (produced by `natix.kernels.rmsnorm_quant`).

Activations: INT8 per token, symmetric: ``x[m, k] ~= x_scale[m] * xq[m, k]``, float32 scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

GROUP_SIZE = 128  # QServe's group size, the default
#: the progressive group sizes the kernels take: the GEMM reads one (s1, sz) per K-block, and an
#: INT8 tensor-core dot needs a K-block of at least 32
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class W4A8Weight:
    """Packed W4A8 weight of one linear layer (see module docstring for the format)."""

    qweight: torch.Tensor  # uint8 [N//2, K]
    scale: torch.Tensor  # float32 [N]
    group_scale: Optional[torch.Tensor] = None  # uint8 [K//G, N] (progressive)
    group_zero: Optional[torch.Tensor] = None  # uint8 [K//G, N] (progressive)
    zero: Optional[torch.Tensor] = None  # uint8 [N] (per-channel)

    @property
    def n(self) -> int:
        return self.qweight.shape[0] * 2

    @property
    def k(self) -> int:
        return self.qweight.shape[1]

    @property
    def group_size(self) -> int:
        """G (32, 64 or 128) for the progressive variant, 0 for per-channel."""
        if self.group_scale is None:
            return 0
        groups = self.group_scale.shape[0]
        return self.k // groups if groups else 0

    def to(self, device: torch.device | str) -> "W4A8Weight":
        f = lambda t: None if t is None else t.to(device)  # noqa: E731
        return W4A8Weight(f(self.qweight), f(self.scale), f(self.group_scale), f(self.group_zero), f(self.zero))

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under the names the exporter writes (``prefix`` + name)."""
        names = ["qweight", "scale", "group_scale", "group_zero", "zero"]
        return {prefix + n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def validate(self) -> None:
        """Assert dtypes/shapes/contiguity; raises ValueError with the offending tensor."""
        qw = self.qweight
        if qw.dtype != torch.uint8 or qw.dim() != 2 or not qw.is_contiguous():
            raise ValueError(f"qweight must be contiguous uint8 [N//2, K], got {qw.dtype} {tuple(qw.shape)}")
        n, k = self.n, self.k
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (n,):
            raise ValueError(f"scale must be float32 [{n}], got {self.scale.dtype} {tuple(self.scale.shape)}")
        if self.group_scale is not None:
            g = self.group_size if self.group_scale.dim() == 2 else 0
            if g not in GROUP_SIZES or k % g:
                raise ValueError(f"progressive weights need group_scale [K // G, N] with G in {GROUP_SIZES} dividing "
                                 f"K={k}, got {tuple(self.group_scale.shape)}")
            for name in ("group_scale", "group_zero"):
                t = getattr(self, name)
                if t is None or t.dtype != torch.uint8 or tuple(t.shape) != (k // g, n) or not t.is_contiguous():
                    raise ValueError(f"{name} must be contiguous uint8 [{k // g}, {n}]")
        elif self.zero is None or self.zero.dtype != torch.uint8 or tuple(self.zero.shape) != (n,):
            raise ValueError(f"per-channel weights need zero uint8 [{n}]")


def pack_uint4(q4: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> uint8 [N//2, K] (row j: low = row j, high = row j + N//2)."""
    n, _ = q4.shape
    if n % 2:
        raise ValueError(f"N must be even for the W4A8 format, got N={n}")
    if q4.numel() and int(q4.max()) > 15:
        raise ValueError("UINT4 codes must be in 0..15")
    q4 = q4.to(torch.uint8)
    return (q4[: n // 2] | (q4[n // 2 :] << 4)).contiguous()


def unpack_uint4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_uint4`: uint8 [N//2, K] -> uint8 codes [N, K]."""
    return torch.cat([qweight & 0xF, qweight >> 4], dim=0)


def check_group(k: int, group_size: int) -> None:
    """Raise ValueError unless ``group_size`` is a progressive group size that divides ``k``."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"progressive group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"g{group_size} needs K % {group_size} == 0, got K={k}")


def pack_progressive(q4: torch.Tensor, s1: torch.Tensor, sz: torch.Tensor, scale: torch.Tensor) -> W4A8Weight:
    """Pack progressive codes; the group size is ``K // s1.shape[1]``.

    q4 uint8 [N, K] (0..15); s1, sz uint8-valued [N, K//G] (level-1 scale, scaled zero);
    scale [N] level-0 channel scale. Checks that every q4*s1 - sz fits INT8.
    """
    n, k = q4.shape
    groups = s1.shape[1] if s1.dim() == 2 and s1.shape[1] else 1
    g = k // groups
    check_group(k, g)
    q8 = q4.to(torch.int32).view(n, k // g, g) * s1.to(torch.int32)[..., None] - sz.to(torch.int32)[..., None]
    if q8.numel() and (int(q8.min()) < -128 or int(q8.max()) > 127):
        raise ValueError("q4 * s1 - sz leaves the INT8 range: level-0 values must be clamped (QServe: [-119, 119])")
    w = W4A8Weight(
        qweight=pack_uint4(q4),
        scale=scale.to(torch.float32).contiguous(),
        group_scale=s1.to(torch.uint8).t().contiguous(),
        group_zero=sz.to(torch.uint8).t().contiguous(),
    )
    w.validate()
    return w


def pack_channel(q4: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> W4A8Weight:
    """Pack per-channel codes: q4 uint8 [N, K], zero [N] (0..15), scale [N]."""
    w = W4A8Weight(qweight=pack_uint4(q4), scale=scale.to(torch.float32).contiguous(), zero=zero.to(torch.uint8).contiguous())
    w.validate()
    return w


def quantize_progressive(w: torch.Tensor, group_size: int = GROUP_SIZE, protect: int = 119) -> W4A8Weight:
    """Round-to-nearest QoQ progressive quantization of a float weight [N, K] in groups of
    ``group_size`` (no GPTQ).

    For tests and benchmarks; the exporter runs GPTQ and calls `pack_progressive` with its own codes.
    """
    w = w.float()
    n, k = w.shape
    check_group(k, group_size)
    scale = (w.abs().amax(dim=1).clamp_min(1e-8) / protect)
    q8 = torch.round(w / scale[:, None]).clamp(-protect, protect).view(n, k // group_size, group_size)
    lo, hi = q8.amin(-1), q8.amax(-1)
    s1 = torch.ceil((hi - lo) / 15).clamp(1, 255)
    z = torch.round(-lo / s1).clamp(0, 15)
    q4 = torch.round(q8 / s1[..., None] + z[..., None]).clamp(0, 15)
    # keep q4*s1 - z*s1 inside INT8 (it can leave it only at the clamped edges)
    q4 = torch.minimum(q4, torch.floor((127 + z * s1) / s1)[..., None])
    q4 = torch.maximum(q4, torch.ceil((-128 + z * s1) / s1)[..., None])
    return pack_progressive(q4.view(n, k).to(torch.uint8), s1.to(torch.uint8), (z * s1).to(torch.uint8), scale)


def quantize_channel(w: torch.Tensor) -> W4A8Weight:
    """Round-to-nearest asymmetric per-channel UINT4 quantization of a float weight [N, K]."""
    w = w.float()
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q4 = torch.round(w / scale[:, None] + zero[:, None]).clamp(0, 15)
    return pack_channel(q4.to(torch.uint8), zero.to(torch.uint8), scale)


def dequantize(w: W4A8Weight) -> torch.Tensor:
    """float32 [N, K] weight the packed tensors represent."""
    return w.scale[:, None] * integer_weight(w).float()


def integer_weight(w: W4A8Weight) -> torch.Tensor:
    """int32 [N, K]: the INT8 level (progressive) or q4 - zero (per-channel) the GEMM multiplies."""
    q4 = unpack_uint4(w.qweight).to(torch.int32)
    if w.group_scale is not None:
        s1 = w.group_scale.t().to(torch.int32).repeat_interleave(w.group_size, dim=1)
        sz = w.group_zero.t().to(torch.int32).repeat_interleave(w.group_size, dim=1)
        return q4 * s1 - sz
    return q4 - w.zero.to(torch.int32)[:, None]


def pack_group_meta(w: W4A8Weight) -> torch.Tensor:
    """int32 [K // G, N // 2]: the level-1 ``(s1, sz)`` of packed row ``j`` (output rows ``j`` and
    ``j + N/2``) in one word, ``s1[j] | sz[j] << 8 | s1[j + N/2] << 16 | sz[j + N/2] << 24``, so a
    GEMM K-block reads its level 1 with one 4-byte load per row instead of four byte loads. A
    launch-side copy built once per layer (`natix.kernels.w4a8_launch.W4A8Gemm`), not part of the
    stored format."""
    if w.group_scale is None or w.group_zero is None:
        raise ValueError("pack_group_meta needs progressive (grouped) weights")
    nh = w.n // 2
    s, z = w.group_scale.to(torch.int32), w.group_zero.to(torch.int32)
    word = s[:, :nh] | z[:, :nh] << 8 | s[:, nh:] << 16 | z[:, nh:] << 24  # wraps into the sign bit: int32 bits
    return word.contiguous()


def describe(group_size: int) -> str:
    """'g64' for a progressive group size, 'per channel' for 0 or -1."""
    return f"g{group_size}" if group_size > 0 else "per channel"


def concat_packed(weights: list[W4A8Weight]) -> W4A8Weight:
    """One packed weight whose output rows are those of ``weights`` in order (e.g. q, k, v into one
    QKV GEMM). The nibble pairing (rows j and j + N/2) spans the whole N, so the codes are unpacked,
    concatenated and packed again; scales and zeros concatenate along N. All parts must share K and
    the variant (the same group size, or per channel)."""
    if not weights:
        raise ValueError("concat_packed needs at least one weight")
    k, g = weights[0].k, weights[0].group_size
    grouped = g > 0
    for w in weights:
        if w.k != k or w.group_size != g:
            raise ValueError(f"cannot fuse weights of K={w.k} ({describe(w.group_size)}) with K={k} ({describe(g)})")
    if len(weights) == 1:
        return weights[0]
    q4 = pack_uint4(torch.cat([unpack_uint4(w.qweight) for w in weights], dim=0))
    scale = torch.cat([w.scale for w in weights]).contiguous()
    if grouped:
        out = W4A8Weight(q4, scale, group_scale=torch.cat([w.group_scale for w in weights], dim=1).contiguous(),
                         group_zero=torch.cat([w.group_zero for w in weights], dim=1).contiguous())
    else:
        out = W4A8Weight(q4, scale, zero=torch.cat([w.zero for w in weights]).contiguous())
    out.validate()
    return out
