"""W8A16 linear: INT8 weights with one float32 scale per output row, activations in the model dtype.

Made for the vocabulary-sized tensors of a small-bit model (w4a8kv4's ``lm_head_bits=8`` /
``embed_bits=8``), where the weight is read once per decode step and its bytes are the cost.

Weight format (:func:`quantize_int8_rows`): ``qweight`` int8 [N, K] (K contiguous), symmetric, codes
in [-127, 127]; ``scale`` float32 [N]; ``W ~= scale[n] * qweight[n, :]``. One format serves both an
lm_head (row n = output channel n) and an embedding table (row n = token n).

Definitions (the references, which the Triton kernel and every engine are tested against):

- :func:`w8a16_linear_reference`: ``y = x.float() @ dequant(W).T (+ bias)`` in float32, rounded to
  ``x.dtype``: activations are never quantized (weight-only);
- :func:`int8_rows_embedding`: ``E[ids] = (qweight[ids].float() * scale[ids]).to(dtype)`` (a gather
  of int8 rows times their scales; the same torch ops on every device).

:func:`w8a16_linear` (CUDA, bf16/fp16 ``x``): a Triton GEMM that loads int8 weight tiles, widens them
to x's dtype in registers (exact: |q| <= 127 fits bf16's 8-bit significand), accumulates
``x · q`` in float32 on the tensor cores and applies the row scale (and bias) in the epilogue, so
the weight is read as one byte per element and never dequantized in memory. It differs from the
reference only in float32 summation order (and ``scale · Σ x q`` vs ``Σ x (q scale)``).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

QMAX = 127


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], float32 [N]): symmetric absmax per row, round to nearest. An
    all-zero row gets scale 1 (codes 0)."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(wf / s[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), s.contiguous()


def dequantize_int8_rows(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] ``scale[n] * qweight[n, :]`` computed in float32, then cast to ``dtype``."""
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def w8a16_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           bias: Optional[torch.Tensor] = None, *, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype``: ``x.float() @ dequant(W).T + bias`` in float32.
    ``weight``: the float32 dequantized weight when the caller keeps one (it must be
    :func:`dequantize_int8_rows` of the same tensors)."""
    w = dequantize_int8_rows(qweight, scale) if weight is None else weight
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def int8_rows_embedding(ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                        ) -> torch.Tensor:
    """Rows ``ids`` of the int8 table, dequantized: ``(qweight[ids].float() * scale[ids]).to(dtype)``."""
    return (qweight[ids].float() * scale[ids].unsqueeze(-1)).to(dtype)


# ------------------------------------------------------------------------------------------ Triton
@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w8a16_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            k_ok = (kb * BK + offs_k) < K
            a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            if DOT_F32:  # the Triton interpreter's bf16 dot is wrong; float32 there, native on the GPU
                acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
            else:
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
            x_ptrs += BK
            w_ptrs += BK
        s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc * s[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return w8a16_kernel


def w8a16_config(m: int) -> dict:
    """Tile sizes for ``m`` rows: decode-sized M takes the smallest MMA tile (16) and streams wide
    weight tiles; larger M reuses each weight tile over more rows. The M <= 8 and 16 < M <= 64 tiles
    are the winners of ``scripts/bench_w8a16.py --sweep`` on an H200 at the Llama-3-8B lm_head
    (128256 x 4096): 150.7 us at M=1 and 257.1 us at M=64 against cuBLAS bf16's 267 / 294 us
    (``reports/engine_notes.md``). Past M=64 the kernel measured 0.57-0.75x of bf16 (M=128, 256)."""
    if m <= 8:
        return dict(BM=16, BN=256, BK=128, num_warps=8, num_stages=3)
    if m <= 16:
        return dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BM=64, BN=256, BK=64, num_warps=8, num_stages=3)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def _check(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16/bf16 [M, K], got {x.dtype} {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x must have contiguous rows")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != x.shape[1] or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be int8 [N, {x.shape[1]}] with contiguous rows, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,) or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}]")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("w8a16_linear runs the Triton kernel: CUDA tensors (or CPU ones under TRITON_INTERPRET=1); "
                         "w8a16_linear_reference computes the same on CPU")
    if not (qweight.device == scale.device == x.device):
        raise ValueError(f"x, qweight and scale must be on one device, got {x.device}, {qweight.device}, {scale.device}")


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 *, check: bool = True, launchers: Optional[dict] = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ dequant(W [N, K]).T (+ bias) -> [M, N] in x.dtype, by the Triton kernel
    (CUDA, or CPU tensors under TRITON_INTERPRET=1). ``launchers``: a dict the caller keeps per weight;
    each tile config's compiled kernel is then called through a lean `natix.kernels.launch.Launcher`
    cached there (keyed by every constexpr) instead of Triton's JIT dispatch."""
    if check:
        _check(x, qweight, scale, bias)
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = w8a16_config(m)
    grid = (-(-n // cfg["BN"]), -(-m // cfg["BM"]))
    consts = dict(HAS_BIAS=bias is not None, DOT_F32=not x.is_cuda, **cfg)
    args = (x, qweight, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), qweight.stride(0), y.stride(0))
    if launchers is None:
        _kernel()[grid](*args, **consts)
        return y
    key = tuple(sorted(consts.items()))
    launch = launchers.get(key)
    if launch is None:
        from .launch import Launcher

        launch = launchers[key] = Launcher(_kernel(), **consts)
    launch(grid, *args)
    return y
    cfg = w8a16_config(m)
    grid = (-(-n // cfg["BN"]), -(-m // cfg["BM"]))
    _kernel()[grid](x, qweight, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0),
                    qweight.stride(0), y.stride(0), HAS_BIAS=bias is not None, DOT_F32=not x.is_cuda, **cfg)
    return y
