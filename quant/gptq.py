"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) with a pluggable quantization grid.

One solver serves both the ``gptq`` (W4A16) and ``w4a8kv4`` (QServe QoQ) schemes; they differ only
in the :class:`Grid` that maps a float column to integer codes:

- :class:`AffineGrid` — asymmetric UINT4 per group, float scale + integer zero (GPTQ W4A16), or
  ``symmetric=True``: zero fixed at the mid code 8, ``scale = 2·absmax/15`` (GPTQ's convention).
  With ``group_size=-1`` it is the per-channel W4A8 variant (identical to `packing.quantize_channel`).
- :class:`ProgressiveGrid` — QoQ progressive: level 0 INT8 per output channel in [-119, 119]
  (float scale, fixed from the original weight before GPTQ), level 1 UINT4 per group (128, 64 or 32) on the
  INT8 values with integer scale ``s1`` and zero ``z``. Codes match `natix.kernels.packing` exactly
  (`ProgressiveGrid.pack` hands them to `packing.pack_progressive`).

Shapes: weight ``W [N, K]`` (out, in features), Hessian ``H [K, K]``, ``G = K // group_size`` groups
(``G = 1`` per channel). Codes are returned in the *original* column order.

Act-order: columns are processed in order of decreasing ``diag(H)`` (``perm``). Groups are then by
default defined on the *permuted* order (GPTQ's ``desc_act``; ``g_idx`` is not monotone and the
packed W4A8 format cannot hold it), or with ``static_groups=True`` on the original order with every
group's parameters fitted on the original weight before any update (what a contiguous-group kernel
format needs). Without act-order, ``g_idx[k] = k // group_size``.

This module imports torch at top; ``natix.quant`` does not import it, so ``import natix.quant`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch

from natix.quant.errors import QuantError

if TYPE_CHECKING:
    from natix.kernels.packing import W4A8Weight


class GptqError(QuantError, ValueError):
    """Invalid GPTQ input (shapes, group size, non-finite Hessian); the message names the layer shape."""


# --------------------------------------------------------------------------------------------- grids


@runtime_checkable
class Grid(Protocol):
    """A quantization grid GPTQ can drive, one group of columns at a time.

    ``channel`` is per-output-channel state computed once from the original weight (e.g. QoQ's
    level-0 scale ``[N]``), or None. ``scale``/``zero`` broadcast against the columns (``[N, 1]``
    while quantizing one group, ``[N, K]`` when dequantizing a whole weight).
    """

    qmin: int
    qmax: int

    def check(self, shape: tuple[int, int], group_size: int) -> None:
        """Raise GptqError if this grid cannot quantize a weight of ``shape`` with ``group_size``."""

    def prepare(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Channel-level state from the original float32 weight ``[N, K]``, or None."""

    def fit(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale ``[N]``, zero ``[N]``) float32 for the columns ``w [N, c]`` of one group."""

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 channel: Optional[torch.Tensor]) -> torch.Tensor:
        """Integer-valued float32 codes ``[N, c]`` in ``[qmin, qmax]`` for ``w [N, c]``."""

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   channel: Optional[torch.Tensor]) -> torch.Tensor:
        """float32 ``[N, c]`` weight the codes represent (the exact value the kernels compute)."""


#: clipping ratios :class:`ProgressiveGrid` tries with ``clip_search`` (1.00 first: min-max)
CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(13))  # 1.00 ... 0.70

@dataclass(frozen=True)
class AffineGrid:
    """UINT``bits`` codes, ``w ≈ scale · (q − zero)``; asymmetric (range includes 0) or symmetric."""

    bits: int = 4
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def check(self, shape: tuple[int, int], group_size: int) -> None:
        if not 2 <= self.bits <= 8:
            raise GptqError(f"AffineGrid supports 2..8 bits, got {self.bits}")

    def prepare(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def fit(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maxq = self.qmax
        if self.symmetric:
            # GPTQ's symmetric convention: the range [-absmax, absmax] over maxq steps, zero at the mid code
            scale = (2 * w.abs().amax(dim=1) / maxq).clamp_min(1e-8)
            return scale, torch.full_like(scale, (maxq + 1) // 2)
        # the same ops as packing.quantize_channel, so RTN per channel reproduces it bit for bit;
        # the range always contains 0 so that zero weights (dead columns) stay exactly 0
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 channel: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.round(w / scale + zero).clamp(0, self.qmax)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   channel: Optional[torch.Tensor]) -> torch.Tensor:
        return scale * (codes - zero)


@dataclass(frozen=True)
class Fp8Grid:
    """FP8 e4m3 per output channel, ``w ≈ scale · e4m3(w / scale)`` (the fp8 scheme's format). The
    codes are the e4m3 bit patterns (uint8 values 0..255 as floats), so GPTQ's integer bookkeeping
    holds them; :meth:`to_fp8` views them back. ``clip_search``: per-channel scales from
    :func:`natix.quant.fp8.search_weight_scale` (weight MSE, or weighted per input column by
    ``clip_weights [K]``) instead of absmax; fitted once on the original weight (per channel only:
    ``group_size=-1``)."""

    clip_search: bool = False
    clip_weights: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    qmin: int = 0
    qmax: int = 255

    def check(self, shape: tuple[int, int], group_size: int) -> None:
        if group_size != -1:
            raise GptqError(f"Fp8Grid is per output channel (group_size=-1), got group_size={group_size}")

    def prepare(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def fit(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from natix.quant.fp8 import FP8_MAX, search_weight_scale

        scale = (search_weight_scale(w, self.clip_weights) if self.clip_search
                 else w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX)
        return scale.float(), torch.zeros_like(scale, dtype=torch.float32)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 channel: Optional[torch.Tensor]) -> torch.Tensor:
        from natix.quant.fp8 import FP8_DTYPE, FP8_MAX

        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q.view(torch.uint8).float()

    @staticmethod
    def to_fp8(codes: torch.Tensor) -> torch.Tensor:
        from natix.quant.fp8 import FP8_DTYPE

        return codes.to(torch.uint8).view(FP8_DTYPE)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   channel: Optional[torch.Tensor]) -> torch.Tensor:
        return self.to_fp8(codes).float() * scale


@dataclass(frozen=True)
class ProgressiveGrid:
    """QServe QoQ progressive grid, groups of 128, 64 or 32 (see module docstring); ``w ≈ scale0 · (q4·s1 − z·s1)``.

    The arithmetic mirrors `natix.kernels.packing.quantize_progressive` op for op, so GPTQ with an
    identity Hessian reproduces it exactly and `pack` feeds `packing.pack_progressive` without re-deriving.
    """

    protect: int = 119  # level-0 clamp: keeps q4·s1 − z·s1 inside INT8 (QServe)
    qmin: int = 0
    qmax: int = 15
    #: level-1 range per group: min-max of the INT8 values (False), or the clipping ratio of
    #: :data:`CLIP_RATIOS` minimizing the group's squared error on them (QServe / AWQ-style weight
    #: clipping; the level-1 scale stays an integer, so nearby ratios often land on the same one)
    clip_search: bool = False

    def check(self, shape: tuple[int, int], group_size: int) -> None:
        from natix.kernels.packing import GROUP_SIZES

        if group_size not in GROUP_SIZES:
            raise GptqError(
                f"ProgressiveGrid needs group_size in {GROUP_SIZES} (the W4A8 progressive format), got {group_size} "
                f"for weight {tuple(shape)}; for per-channel W4A8 use AffineGrid() with group_size=-1")
        if shape[0] % 2:
            raise GptqError(f"the W4A8 format needs an even N (out features), got weight {tuple(shape)}")

    def prepare(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return weight.abs().amax(dim=1).clamp_min(1e-8) / self.protect

    def _level0(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> torch.Tensor:
        assert channel is not None, "ProgressiveGrid.prepare() was not called"
        return torch.round(w / channel[:, None]).clamp(-self.protect, self.protect)

    def fit(self, w: torch.Tensor, channel: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q8 = self._level0(w, channel)
        lo, hi = q8.amin(dim=1), q8.amax(dim=1)
        s1, z = self._level1(lo, hi)
        if not self.clip_search:
            return s1, z
        best = ((self._snap(q8, s1[:, None], z[:, None]) - q8).square().sum(dim=1))
        for r in CLIP_RATIOS[1:]:
            cs, cz = self._level1(lo * r, hi * r)
            err = (self._snap(q8, cs[:, None], cz[:, None]) - q8).square().sum(dim=1)
            better = err < best  # ties keep the wider range
            best = torch.where(better, err, best)
            s1, z = torch.where(better, cs, s1), torch.where(better, cz, z)
        return s1, z

    @staticmethod
    def _level1(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s1 = torch.ceil((hi - lo) / 15).clamp(1, 255)
        return s1, torch.round(-lo / s1).clamp(0, 15)

    def _snap(self, q8: torch.Tensor, s1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The INT8 values level-1 codes (s1, z) represent for ``q8`` (`quantize`, then dequantized)."""
        return (self.quantize_level1(q8, s1, z) - z) * s1

    def quantize_level1(self, q8: torch.Tensor, s1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q4 = torch.round(q8 / s1 + z).clamp(0, 15)
        # q4·s1 − z·s1 must fit INT8; it can leave it only at the clamped edges (as in quantize_progressive)
        q4 = torch.minimum(q4, torch.floor((127 + z * s1) / s1))
        return torch.maximum(q4, torch.ceil((-128 + z * s1) / s1))

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 channel: Optional[torch.Tensor]) -> torch.Tensor:
        return self.quantize_level1(self._level0(w, channel), scale, zero)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   channel: Optional[torch.Tensor]) -> torch.Tensor:
        assert channel is not None, "ProgressiveGrid needs the level-0 channel scale"
        # integer-valued floats (|.| < 2^24) are exact, so this equals packing.dequantize bit for bit
        return channel[:, None] * (codes * scale - zero * scale)

    def pack(self, result: "GptqResult") -> "W4A8Weight":
        """The packed W4A8 progressive weight (`packing.pack_progressive`) of a GPTQ result made with this grid."""
        from natix.kernels.packing import GROUP_SIZES, pack_progressive

        n, k = result.codes.shape
        g = result.group_size
        if result.channel_scale is None or g not in GROUP_SIZES:
            raise GptqError(f"result for weight {(n, k)} was not made with ProgressiveGrid (group_size {g})")
        if not torch.equal(result.g_idx, torch.arange(k, device=result.g_idx.device) // g):
            raise GptqError(f"weight {(n, k)}: act_order groups are permuted; the W4A8 format needs "
                            "contiguous groups, so quantize with static_groups=True")
        s1, z = result.scale, result.zero
        return pack_progressive(result.codes.to(torch.uint8), s1.to(torch.uint8), (z * s1).to(torch.uint8),
                                result.channel_scale)


# ------------------------------------------------------------------------------------------ hessian


class HessianAccumulator:
    """Streaming ``H = 2/n · Σ x xᵀ`` over the rows ``x [K]`` of a linear layer's inputs.

    Memory is one ``[K, K]`` fp64 sum plus a bounded chunk (``chunk_rows × K``) of upcast inputs,
    whatever the number of calibration tokens. ``n`` counts rows (tokens), not sequences; GPTQ is
    invariant to the scale of H (its dampening is relative), so this choice only fixes the units.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None, chunk_rows: int = 4096) -> None:
        if in_features <= 0:
            raise GptqError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.chunk_rows = chunk_rows
        self._sum: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``x (..., K)``."""
        if x.shape[-1] != self.in_features:
            raise GptqError(f"activations {tuple(x.shape)} do not end in in_features={self.in_features}")
        if self._sum is None:
            raise GptqError("this accumulator's Hessian was already consumed")
        x = x.detach().reshape(-1, self.in_features)
        for start in range(0, x.shape[0], self.chunk_rows):
            c = x[start:start + self.chunk_rows].to(device=self._sum.device, dtype=self._sum.dtype)
            if not torch.isfinite(c).all():
                raise GptqError(f"non-finite calibration activations for a layer with in_features={self.in_features}")
            self._sum.addmm_(c.t(), c)
        self.n += x.shape[0]

    def hessian(self, *, consume: bool = False) -> torch.Tensor:
        """``[K, K]`` in the accumulator's dtype; raises if nothing was accumulated. ``consume``: scale
        the sum in place and hand it over (no second [K, K] copy; the accumulator is done after it)."""
        if self.n == 0:
            raise GptqError(f"no calibration activations reached the layer (in_features={self.in_features})")
        if self._sum is None:
            raise GptqError("this accumulator's Hessian was already consumed")
        if not consume:
            return self._sum * (2.0 / self.n)
        h, self._sum = self._sum.mul_(2.0 / self.n), None
        return h

    def hook(self, module: torch.nn.Linear) -> torch.utils.hooks.RemovableHandle:
        """Register a forward pre-hook on ``module`` that accumulates its input; remove the handle when done."""
        if getattr(module, "in_features", self.in_features) != self.in_features:
            raise GptqError(f"module has in_features={module.in_features}, accumulator {self.in_features}")
        return module.register_forward_pre_hook(lambda _m, args: self.add(args[0]))

    @classmethod
    @contextmanager
    def collect(cls, module: torch.nn.Linear, **kw) -> Iterator["HessianAccumulator"]:
        """``with HessianAccumulator.collect(linear) as acc: model(batch)`` — the hook lives for the block."""
        acc = cls(module.in_features, device=module.weight.device, **kw)
        handle = acc.hook(module)
        try:
            yield acc
        finally:
            handle.remove()


# ------------------------------------------------------------------------------------------ solver


@dataclass(frozen=True)
class GptqResult:
    """GPTQ output for one weight ``[N, K]``; every tensor is in the original column order.

    ``codes`` int32 ``[N, K]``; ``scale``, ``zero`` float32 ``[N, G]`` (for ProgressiveGrid the
    integer level-1 ``s1`` and the *unscaled* zero ``z``); ``g_idx`` int64 ``[K]`` (group of each
    column); ``perm`` int64 ``[K]`` processing order (act_order) or None; ``channel_scale`` ``[N]``
    level-0 scale (ProgressiveGrid) or None; ``dequantized`` float32 ``[N, K]`` equals
    ``grid.dequantize`` of the codes exactly; ``loss`` is GPTQ's Σ (w−q)²/[H⁻¹]ᵢᵢ / 2 over the
    damped Hessian; ``percdamp`` the dampening actually used.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    perm: Optional[torch.Tensor]
    channel_scale: Optional[torch.Tensor]
    dequantized: torch.Tensor
    loss: float
    group_size: int
    percdamp: float

    def dequantize(self, grid: Grid) -> torch.Tensor:
        """Recompute the float32 ``[N, K]`` weight from codes/scale/zero (what an engine would do)."""
        return grid.dequantize(self.codes.float(), self.scale[:, self.g_idx], self.zero[:, self.g_idx],
                               self.channel_scale)


def rtn_quantize(weight: torch.Tensor, grid: Grid, *, group_size: int = 128) -> GptqResult:
    """Round-to-nearest with the same grid (the baseline): GPTQ with an identity Hessian is exactly this."""
    k = weight.shape[-1] if weight.dim() == 2 else 0
    return gptq_quantize(weight, torch.eye(k), grid, group_size=group_size, percdamp=0.0)


def _validate(weight: torch.Tensor, H: torch.Tensor, group_size: int, block_size: int, percdamp: float) -> None:
    if weight.dim() != 2:
        raise GptqError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(H.shape) != (k, k):
        raise GptqError(f"Hessian must be [K, K] = [{k}, {k}] for weight {(n, k)}, got {tuple(H.shape)}")
    if not torch.isfinite(weight).all():
        raise GptqError(f"weight {(n, k)} has non-finite values")
    if not torch.isfinite(H).all():
        raise GptqError(f"non-finite Hessian for weight {(n, k)}: the calibration activations overflowed or "
                        "contain NaN/inf (accumulate in fp32/fp64)")
    if group_size != -1 and (group_size <= 0 or k % group_size):
        raise GptqError(
            f"in_features K={k} of weight {(n, k)} is not divisible by group_size={group_size}; "
            "use group_size=-1 (per-channel) or a group size that divides K")
    if block_size <= 0:
        raise GptqError(f"block_size must be positive, got {block_size}")
    if not 0 <= percdamp < 1e3:
        raise GptqError(f"percdamp must be >= 0, got {percdamp}")


def _inverse_cholesky(working: Callable[[], torch.Tensor], percdamp: float, shape: tuple[int, int]
                      ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (fp64), λ = percdamp·mean(diag H); ``working()``
    returns a fresh private copy of H, which is damped, factored and inverted in place.

    If H is not positive definite at this dampening (rank-deficient calibration), retry with 10× more
    up to three times (on a new copy) — the result records what was used rather than failing the export.

    Memory: that one ``[K, K]`` copy beside the caller's H (at K = 14336, a down_proj of Llama-3-8B,
    each is 1.6 GB), no identity matrix and no other temporary of that size. The damped diagonal is
    ``H_ii + λ``, as ``H + λ·I`` computes it, so the factor is the same bits.
    """
    A = working()
    mean_diag = A.diagonal().mean().item()
    info = torch.zeros((), dtype=torch.int32, device=A.device)
    damp = percdamp
    for attempt in range(4):
        if attempt:
            A = working()
        A.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info.item() == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info.item() == 0:
                return A, damp
        del A
        damp = max(damp * 10, 1e-4)
    raise GptqError(f"Hessian of weight {shape} is not positive definite even with percdamp={damp / 10:g}")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, grid: Grid, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, group_size: int = 128,
                  static_groups: bool = False) -> GptqResult:
    """Quantize ``weight [N, K]`` column by column, compensating each rounding error on the
    not-yet-quantized columns through the inverse Hessian ``H [K, K]`` (Frantar et al. 2022).

    ``group_size=-1`` is per-channel (one group of K). See the module docstring for act-order groups.
    Work happens in float32 on ``weight.device`` (the Hessian inverse in float64 for stability).
    """
    _validate(weight, H, group_size, block_size, percdamp)
    n, k = weight.shape
    grid.check((n, k), group_size)
    gs = k if group_size == -1 else group_size
    n_groups = k // gs
    dev = weight.device

    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(device=dev, dtype=torch.float64)  # the caller's tensor where it already is one: never written
    channel = grid.prepare(W)  # from the original weight, before dead columns are zeroed

    # a column whose input is always 0 carries no signal: H_ii = 1 keeps H invertible, and w = 0
    # (representable by every grid here) keeps the zeroed weight exact
    dead = H.diagonal() == 0
    W[:, dead] = 0.0
    diag = torch.where(dead, 1.0, H.diagonal())

    # static groups: parameters fitted on the (original-order) weight before any error feedback
    static: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    if group_size == -1 or (act_order and static_groups):
        fits = [grid.fit(W[:, g * gs:(g + 1) * gs], channel) for g in range(n_groups)]
        static = (torch.stack([f[0] for f in fits], 1), torch.stack([f[1] for f in fits], 1))

    perm: Optional[torch.Tensor] = None
    if act_order:
        # largest-Hessian columns first: they are quantized while most freedom to compensate is left
        perm = torch.argsort(diag, descending=True, stable=True)
        W = W[:, perm]
        dead = dead[perm]
    orig_col = perm if perm is not None else torch.arange(k, device=dev)
    col_group = (orig_col // gs).tolist() if static is not None else None  # read once, not a device sync per column

    def working() -> torch.Tensor:  # H, dead columns set, in processing order: one gather or one copy
        P = H[perm[:, None], perm] if perm is not None else H.clone()
        P[dead, dead] = 1.0
        return P

    U64, damp_used = _inverse_cholesky(working, percdamp, (n, k))
    U = U64.to(torch.float32)
    del U64, working
    H = None  # the fp64 copy (when the caller's was another dtype) is not needed past the factor

    Q = torch.zeros_like(W)  # dequantized columns (permuted order)
    codes = torch.zeros_like(W)
    scale = torch.zeros(n, n_groups, dtype=torch.float32, device=dev)
    zero = torch.zeros_like(scale)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    s_cur = z_cur = torch.zeros(n, 1, device=dev)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = col_group[col]
                s_cur, z_cur = static[0][:, g:g + 1], static[1][:, g:g + 1]
            elif col % gs == 0:
                # fit on the group's *current* values: columns in this block have the in-block
                # updates; columns past the block get the pending lazy-batch update applied here
                g_end = col + gs
                cur = W1[:, i:min(g_end, i2) - i1]
                if g_end > i2:
                    ahead = W[:, i2:g_end] - Err1[:, :i] @ U[i1:col, i2:g_end]
                    cur = torch.cat([cur, ahead], dim=1)
                s, z = grid.fit(cur, channel)
                s_cur, z_cur = s[:, None], z[:, None]
                scale[:, col // gs], zero[:, col // gs] = s, z
            w = W1[:, i:i + 1]
            q = grid.quantize(w, s_cur, z_cur, channel)
            dq = grid.dequantize(q, s_cur, z_cur, channel)
            codes[:, col:col + 1], Q[:, col:col + 1] = q, dq
            d = U1[i, i]
            err = (w - dq) / d
            loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err @ U1[i:i + 1, i:]  # OBS update of the rest of the block
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch: one GEMM per block for the columns after it

    if static is not None:
        scale, zero = static
    g_idx = torch.arange(k, device=dev) // gs
    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
        if static is None:
            g_idx = inv // gs  # original column perm[j] sits at position j, in group j // gs
    codes = codes.to(torch.int32)
    if int(codes.min()) < grid.qmin or int(codes.max()) > grid.qmax:
        raise AssertionError("grid produced codes outside [qmin, qmax]")  # a Grid bug, not a user error
    return GptqResult(codes=codes, scale=scale, zero=zero, g_idx=g_idx, perm=perm, channel_scale=channel,
                      dequantized=Q, loss=float(loss), group_size=group_size, percdamp=damp_used)


__all__ = ["AffineGrid", "Fp8Grid", "GptqError", "GptqResult", "Grid", "HessianAccumulator", "ProgressiveGrid",
           "gptq_quantize", "rtn_quantize"]
