"""Progressive (grouped) W4A8 weights expanded to their INT8 level-1 matrix, for compute-bound GEMMs.

The W4A8 GEMM applies level 1 (``q4 * s1 - sz``, QServe's progressive format) to every weight in its
main loop. At decode sizes the GEMM is bound by weight bytes and that work hides under the loads; at
prefill sizes (thousands of rows) every weight tile is reused by many row tiles and the per-weight
arithmetic becomes the bound: g128 measured 1.7-1.9x per channel's time at M = 1024 on the H200
(reports/kernels_notes.md). At those sizes :class:`natix.kernels.w4a8_launch.W4A8Gemm` first writes
the layer's INT8 level-1 weight ``[N, K]`` (the matrix `natix.kernels.packing.integer_weight` gives)
into a scratch buffer shared by every layer of the device, then runs the GEMM's INT8-weight mode
(``W8``: two int8 tiles per K-block, no unpacking, no zero point). Expanding reads the packed weight
once and writes N*K bytes: ~40 us for a 28672 x 4096 layer, against the ~150 us it saves there at
M = 1024. vLLM's AWQ linear takes the same route at large batch (dequantize, then a dense GEMM).

The scratch is sized when a layer is prepared, to the largest layer (N*K bytes; 117 MB for Llama-3-8B's
fused gate/up), and reused, so calls on one stream are ordered; it is never used inside CUDA graphs (decode
batches are below the expansion threshold).
"""
from __future__ import annotations

import functools

import torch

from .packing import W4A8Weight

_SCRATCH: dict[torch.device, torch.Tensor] = {}


def scratch(device: torch.device, numel: int) -> torch.Tensor:
    """The device's int8 expansion buffer, at least ``numel`` bytes (grown, never shrunk)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(device, None)  # free the old one before allocating the larger
        buf = torch.empty(numel, dtype=torch.int8, device=device)
        _SCRATCH[device] = buf
    return buf


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expand_kernel(qw_ptr, gs_ptr, gz_ptr, out_ptr, N, K, BJ: tl.constexpr, GS: tl.constexpr):
        # one program: BJ packed rows (output rows j and j + N/2) x one group of K
        pj = tl.program_id(0)
        g = tl.program_id(1)
        NH = N // 2
        offs_j = pj * BJ + tl.arange(0, BJ)
        offs_k = g * GS + tl.arange(0, GS)
        j_ok = offs_j < NH
        b = tl.load(qw_ptr + offs_j[:, None] * K + offs_k[None, :], mask=j_ok[:, None], other=0).to(tl.int32)
        s_lo = tl.load(gs_ptr + g * N + offs_j, mask=j_ok, other=0).to(tl.int32)[:, None]
        z_lo = tl.load(gz_ptr + g * N + offs_j, mask=j_ok, other=0).to(tl.int32)[:, None]
        s_hi = tl.load(gs_ptr + g * N + NH + offs_j, mask=j_ok, other=0).to(tl.int32)[:, None]
        z_hi = tl.load(gz_ptr + g * N + NH + offs_j, mask=j_ok, other=0).to(tl.int32)[:, None]
        o = out_ptr + offs_j[:, None] * K + offs_k[None, :]
        tl.store(o, ((b & 0xF) * s_lo - z_lo).to(tl.int8), mask=j_ok[:, None])
        tl.store(o + NH * K, ((b >> 4) * s_hi - z_hi).to(tl.int8), mask=j_ok[:, None])

    return expand_kernel


class Expander:
    """Writes one grouped layer's INT8 level-1 weight into the device's scratch; prepared once per layer."""

    BJ = 32

    def __init__(self, w: W4A8Weight) -> None:
        if w.group_scale is None or w.group_zero is None:
            raise ValueError("only progressive (grouped) weights expand to INT8 level 1")
        from .launch import Launcher

        self.w = w
        scratch(w.qweight.device, w.n * w.k)  # allocated with the layer, not in its first prefill (and counted
        # by whatever sizes memory after the model loads, e.g. the natix engine's KV cache budget)
        self.grid = (-(-(w.n // 2) // self.BJ), w.k // w.group_size, 1)
        self.launch = Launcher(_kernel(), BJ=self.BJ, GS=w.group_size, num_warps=4)

    def __call__(self) -> torch.Tensor:
        """The int8 [N, K] level-1 weight (a view of the shared scratch: valid until the next expansion)."""
        w = self.w
        out = scratch(w.qweight.device, w.n * w.k)[: w.n * w.k].view(w.n, w.k)
        self.launch(self.grid, w.qweight, w.group_scale, w.group_zero, out, w.n, w.k)
        return out
