"""A W4A8 GEMM prepared once per layer, so a call costs a launch and nothing else.

`natix.kernels.w4a8_gemm.w4a8_gemm` is the general entry: a torch.library op that rebuilds the
weight record, validates every tensor, looks the config up and then launches, on every call. An
engine calls the same layer thousands of times with the same weight, so :class:`W4A8Gemm` does all
of that at construction (validation, constexpr flags, dummy pointers) and keeps the tuned config of
each M bucket after its first use, with a `natix.kernels.launch.Launcher` that calls the compiled
kernel's launcher directly; ``__call__`` allocates the output (and split-K partials) and launches.
Progressive weights at prefill sizes are first expanded to INT8 (`natix.kernels.w4a8_expand`). Off
CUDA (and outside the Triton interpreter) it computes the exact reference instead,
with the integer weight unpacked once (as float32: the CPU path is for small models).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .packing import GROUP_SIZE, W4A8Weight, integer_weight, pack_group_meta
from .w4a8_gemm import (M_BUCKETS, _counters, _kernel, byte_unpack, fit_block_k, get_config, group_epilogue,
                        int_matmul_exact, xsum_on_tensor_cores)


_PLANNED_M = 256
#: rows from which progressive weights are expanded to INT8 before the GEMM (`natix.kernels.w4a8_expand`).
#: H200, run h200-s21b, g128: expanded 1.23-1.42x bf16 at M = 1024 on the four Llama-3-8B shapes against
#: 0.85-1.01x in the loop; at M = 256 it wins on the 4096-wide layers and loses on the larger two
EXPAND_M = 1024


class W4A8Gemm:
    """``y [M, N] = dequant(xq [M, K], x_scale [M]) @ dequant(weight)^T (+ bias)`` in ``out_dtype``.

    ``x_sum`` (int32 [M], per-token sum of the INT8 codes) is needed by per-channel weights.
    Inputs are trusted: callers produce them with natix.kernels' quantizers (right dtypes and
    shapes), which is what makes skipping per-call checks safe.
    """

    def __init__(self, weight: W4A8Weight, bias: Optional[torch.Tensor] = None,
                 out_dtype: torch.dtype = torch.bfloat16, gemv: bool = True,
                 use_triton: Optional[bool] = None, config: Optional[dict] = None,
                 expand_m: Optional[int] = None) -> None:
        """``config``: one GEMM configuration for every M instead of the tuned table's (the tuner and
        benchmarks time candidates through the path the engine runs); ``gemv=False``: the GEMM at M = 1 too.
        ``expand_m``: progressive weights are expanded to INT8 from this many rows (default
        ``NATIX_W4A8_EXPAND_M`` or `EXPAND_M`; 0 never)."""
        weight.validate()
        if weight.k % 4:
            raise ValueError(f"K={weight.k}: the kernel reads weight rows as int32 words (K % 4 == 0)")
        if bias is not None and (tuple(bias.shape) != (weight.n,) or not bias.is_contiguous()):
            raise ValueError(f"bias must be contiguous [{weight.n}]")
        self.weight, self.bias, self.out_dtype = weight, bias, out_dtype
        self.n, self.k = weight.n, weight.k
        self.grouped = weight.group_scale is not None
        self.group_size = weight.group_size  # 0: per channel
        dev = weight.qweight.device
        # None: the kernel on CUDA and under the interpreter; an engine that runs references on CPU says False
        self.triton = (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") if use_triton is None else use_triton
        self._configs: dict[tuple[int, bool], dict] = {}
        self._plans: dict[int, tuple] = {}
        self._forced = config
        self._wi: Optional[torch.Tensor] = None
        from .w4a8_gemv import can_implement_gemv, gemv_config

        #: one row (batch-1 decode) goes to the CUDA-core GEMV (`natix.kernels.w4a8_gemv`) where it measured faster
        self._gemv_cfg: Optional[dict] = None
        if gemv and self.triton and can_implement_gemv(weight)[0]:
            self._gemv_cfg = gemv_config(self.n, self.k, self.group_size, dev)
        self.gemv = self._gemv_cfg is not None
        w = weight
        dummy = w.scale
        # argument tuple of the kernel after (x_q, x_scale, x_sum): weight tensors and bias
        self._wargs = (w.qweight, w.scale, w.group_scale if self.grouped else dummy,
                       w.group_zero if self.grouped else dummy, dummy if self.grouped else w.zero,
                       bias if bias is not None else dummy)
        #: with level 1 after the dot, the GEMM reads (s1, sz) as one packed word per row
        #: (`pack_group_meta`; 1/64 of the packed weight's bytes at g128, built here, not inside a graph
        #: capture): 10-20% faster at M <= 16 on the H200 (run h200-s20a); before the dot it measured
        #: -6%..+6%, so that path keeps the byte loads
        self.meta = self.grouped and self.triton and os.environ.get("NATIX_W4A8_META", "1") != "0"
        self._meta_wargs = (w.qweight, w.scale, pack_group_meta(w), dummy, dummy, self._wargs[5]) if self.meta else None
        if expand_m is None:
            expand_m = int(os.environ.get("NATIX_W4A8_EXPAND_M", EXPAND_M))
        #: compute-bound sizes: level 1 once per weight into a scratch INT8 matrix, then the INT8-weight GEMM
        self._expander = None
        self.expand_m = expand_m if self.grouped and self.triton and expand_m > 0 else 0
        if self.expand_m:
            from .w4a8_expand import Expander

            self._expander = Expander(w)
            #: the INT8-weight GEMM: no level 1, no zero point (the weight pointer is the scratch, per call)
            self._w8_wargs = (None, w.scale, dummy, dummy, dummy, self._wargs[5])

    def _config(self, m: int, w8: bool = False) -> dict:
        """The config and launcher of ``m`` rows; ``w8``: of the INT8-weight GEMM on expanded
        weights (its own table entries, else the per-channel tiles: the same main loop without unpacking)."""
        bucket = next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])
        cfg = self._configs.get((bucket, w8))
        if cfg is None:
            grouped = self.grouped and not w8
            cfg = dict(self._forced) if self._forced else get_config(bucket, self.n, self.k, grouped,
                                                                     self.weight.qweight.device, w8)
            cfg["BK"] = fit_block_k(cfg["BK"], 0 if w8 else self.group_size)
            cfg = dict(cfg, EVEN_K=self.k % cfg["BK"] == 0, GROUP_M=cfg.get("GROUP_M", 8),
                       num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
            from .launch import Launcher

            epi = not w8 and group_epilogue(cfg, self.group_size)
            meta = epi and self.meta
            cfg["wargs"] = self._w8_wargs if w8 else self._meta_wargs if meta else self._wargs
            cfg["launch"] = Launcher(
                _kernel(), GROUPED=grouped, HAS_BIAS=self.bias is not None, RAW_OUT=self.out_dtype == torch.int32,
                EVEN_K=cfg["EVEN_K"], BM=cfg["BM"], BNH=cfg["BNH"], BK=cfg["BK"], SPLIT_K=cfg["SPLIT_K"],
                GROUP_M=cfg["GROUP_M"], GS=self.group_size or GROUP_SIZE, GROUP_EPI=epi, META=meta,
                XSUM_DOT=epi and xsum_on_tensor_cores(), BYTES=not w8 and byte_unpack(grouped, epi), W8=w8,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            self._configs[(bucket, w8)] = cfg
        return cfg

    def expands(self, m: int) -> bool:
        """Whether a call with ``m`` rows expands the weights to INT8 first (`natix.kernels.w4a8_expand`)."""
        return bool(self.expand_m) and m >= self.expand_m

    def _plan(self, m: int, device: torch.device) -> tuple:
        """Everything a call with ``m`` rows launches with except its activations and output: the
        launcher, grid, split-K partials size, weight arguments and ticket counters. Kept per M up to
        ``_PLANNED_M`` rows (decode batches: a call is then a dictionary lookup), rebuilt per call above,
        where the GEMM's own time dwarfs it and prefill lengths would make the cache grow without bound."""
        if m == 1 and self.gemv:
            cfg = self._gemv_cfg
            assert cfg is not None
            from .launch import Launcher
            from .w4a8_gemv import _kernel as gemv_kernel

            blocks = -(-(self.n // 2) // cfg["BNH"])
            launch = Launcher(gemv_kernel(), GROUPED=self.grouped, HAS_BIAS=self.bias is not None,
                              RAW_OUT=self.out_dtype == torch.int32, BNH=cfg["BNH"], BK=cfg["BK"],
                              SPLIT_K=cfg["SPLIT_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            plan = (launch, (blocks, cfg["SPLIT_K"], 1), cfg["SPLIT_K"] * self.n if cfg["SPLIT_K"] > 1 else 0,
                    self._wargs, _counters(device, blocks), True, None)
        else:
            w8 = self.expands(m)
            cfg = self._config(m, w8)
            split = cfg["SPLIT_K"]
            tiles = -(-m // cfg["BM"]) * -(-(self.n // 2) // cfg["BNH"])
            plan = (cfg["launch"], (tiles, split, 1), split * m * self.n if split > 1 else 0, cfg["wargs"],
                    _counters(device, tiles), False, self._expander if w8 else None)
        if m <= _PLANNED_M:
            self._plans[m] = plan
        return plan

    def __call__(self, x_q: torch.Tensor, x_scale: torch.Tensor, x_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = x_q.shape[0]
        if not self.triton:
            return self.reference(x_q, x_scale)
        out = torch.empty((m, self.n), dtype=self.out_dtype, device=x_q.device)
        if m == 0:
            return out
        plan = self._plans.get(m) or self._plan(m, x_q.device)
        launch, grid, part_n, (qw, ws, gs, gz, wz, b), cnt, gemv, expand = plan
        if expand is not None:
            qw = expand()
        # split-K partials: a fresh buffer per call. One workspace shared by every GEMM measured 6% slower
        # per decode step inside CUDA graphs (run h200-s20c: 2.584 vs 2.432 ms per channel, B=1)
        part = torch.empty(part_n, dtype=torch.int32, device=x_q.device) if part_n else out
        xsum = x_sum if x_sum is not None else ws
        # the specialization key over what varies between calls: the weights, partials, counters and
        # N, K are this layer's for good, and a fresh output is always 16-byte aligned with row stride N
        if gemv:
            launch.keyed((x_q, x_scale, xsum), grid, x_q, x_scale, xsum, qw, ws, gs, gz, wz, b, out, part, cnt,
                         self.n, self.k)
        else:
            sx = x_q.stride(0)
            launch.keyed((x_q, x_scale, xsum, m, sx), grid, x_q, x_scale, xsum, qw, ws, gs, gz, wz, b, out, part, cnt,
                         m, self.n, self.k, sx, self.n)
        return out

    def reference(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The exact integer GEMM (`natix.kernels.w4a8_gemm.w4a8_gemm_reference`), integer weight kept."""
        if self._wi is None:  # float32 holds the integers exactly and skips a conversion per call
            self._wi = integer_weight(self.weight).float()
        acc = int_matmul_exact(x_q, self._wi)
        if self.out_dtype == torch.int32:
            return acc
        y = acc.float() * x_scale.float()[:, None] * self.weight.scale.float()[None, :]
        if self.bias is not None:
            y = y + self.bias.float()[None, :]
        return y.to(self.out_dtype)
