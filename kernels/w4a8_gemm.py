"""W4A8 GEMM: INT8 per-token activations x UINT4 weights on INT8 tensor cores (QServe QoQ).

``out[m, n] = x_scale[m] * scale[n] * sum_k xq[m, k] * Wi[n, k] (+ bias[n])`` where ``Wi`` is the
integer weight of `natix.kernels.packing` (progressive: ``q4*s1 - sz``, per-channel: ``q4 - zero``, the
latter applied in the epilogue as ``- x_sum[m] * zero[n]``). Accumulation is int32 and exact.

Kernel shape: swap-AB. The program computes ``acc[BNH, BM] = Wtile[BNH, BK] @ xq^T[BK, BM]`` twice
(low nibbles -> columns ``j``, high nibbles -> columns ``j + N/2``), so the unpacked weights are the
register-side operand and small M costs only a 16-wide MMA N dimension. For small M, split-K over
``SPLIT_K`` programs: each writes int32 partials, and the last to arrive (atomic ticket) sums them
and runs the epilogue, so the whole GEMM stays one launch (CUDA-graph friendly, no memset).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .packing import GROUP_SIZE, W4A8Weight, integer_weight

_CONFIG_FILE = Path(__file__).with_name("configs") / "w4a8_gemm.json"
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)


# ----------------------------------------------------------------------------------------------
# reference (the CPU path)
# ----------------------------------------------------------------------------------------------
# |xq * wi| <= 127 * 128 = 16256, so a sum of 1024 such products stays below 2^24 and an fp32
# matmul over a 1024-wide slice of K is exact; the slices are then added in fp64 (exact too).
_EXACT_K_SLICE = 1024


def int_matmul_exact(x_q: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = ``x_q [M, K]`` (int8 codes) @ ``wi [N, K]``ᵀ (integers in [-128, 127]), exact.

    Done as fp32 matmuls over K slices of 1024 (exact, see above) summed in fp64: BLAS speed on
    CPU, where an int64 matmul has no fast kernel (~100x slower at SmolLM2's shapes)."""
    acc: Optional[torch.Tensor] = None
    for k0 in range(0, x_q.shape[-1], _EXACT_K_SLICE):
        part = x_q[:, k0:k0 + _EXACT_K_SLICE].float() @ wi[:, k0:k0 + _EXACT_K_SLICE].float().t()
        acc = part.double() if acc is None else acc + part.double()
    if acc is None:  # K == 0
        return torch.zeros(x_q.shape[0], wi.shape[0], dtype=torch.int32, device=x_q.device)
    return acc.to(torch.int32)


def w4a8_gemm_int_reference(x_q: torch.Tensor, w: W4A8Weight) -> torch.Tensor:
    """int32 [M, N] = xq [M, K] (int8) @ Wi^T, exact."""
    return int_matmul_exact(x_q, integer_weight(w))


def w4a8_gemm_reference(
    x_q: torch.Tensor, x_scale: torch.Tensor, w: W4A8Weight, bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16, wi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[M, N] out_dtype; the float epilogue in float32 like the kernel. ``wi``: ``integer_weight(w)``
    if the caller keeps it (a module reused across calls), else computed here."""
    acc = int_matmul_exact(x_q, integer_weight(w) if wi is None else wi)
    if out_dtype == torch.int32:
        return acc
    y = acc.float() * x_scale.float()[:, None] * w.scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
def device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace(" ", "_")


@functools.lru_cache(maxsize=None)
def _load_configs() -> dict:
    if _CONFIG_FILE.exists():
        return json.loads(_CONFIG_FILE.read_text())
    return {}


def default_config(m: int, n: int, k: int, grouped: bool, num_sms: int = 132) -> dict:
    """Heuristic when no tuned entry exists for (device, variant, N, K, M bucket)."""
    bk = 128
    if m <= 16:
        bm, bnh, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        bm, bnh, warps, stages = 64, 64, 4, 4
    elif m <= 256:
        bm, bnh, warps, stages = 128, 64, 4, 4
    else:
        bm, bnh, warps, stages = 128, 128, 8, 3
    tiles = -(-m // bm) * -(-(n // 2) // bnh)
    k_iters = -(-k // bk)
    split = 1
    while tiles * split * 2 <= 2 * num_sms and k_iters // (split * 2) >= 4:
        split *= 2
    return dict(BM=bm, BNH=bnh, BK=bk, SPLIT_K=split, GROUP_M=8, num_warps=warps, num_stages=stages)


def get_config(m: int, n: int, k: int, grouped: bool, device: torch.device, w8: bool = False) -> dict:
    """The tuned config of (device, variant, N, K, M bucket), else `default_config`. Variants: ``g128``
    (every progressive group size uses its tiles, `fit_block_k`), ``channel``, and ``w8`` (the INT8-weight
    GEMM on expanded progressive weights, `natix.kernels.w4a8_expand`; falls back to ``channel``'s tiles)."""
    cards = _load_configs().get(device_key(device), {})
    bucket = str(next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1]))
    for variant in (["w8", "channel"] if w8 else ["g128" if grouped else "channel"]):
        cfg = cards.get(variant, {}).get(f"{n},{k}", {}).get(bucket)
        if cfg:
            return dict(cfg)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return default_config(m, n, k, grouped, sms)


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w4a8_kernel(
        x_ptr, xs_ptr, xsum_ptr, qw_ptr, ws_ptr, gs_ptr, gz_ptr, wz_ptr, bias_ptr, out_ptr,
        part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_om,
        GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, RAW_OUT: tl.constexpr, EVEN_K: tl.constexpr,
        BM: tl.constexpr, BNH: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
        GS: tl.constexpr, GROUP_EPI: tl.constexpr, META: tl.constexpr = False, XSUM_DOT: tl.constexpr = False,
        BYTES: tl.constexpr = False, W8: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        NH = N // 2
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(NH, BNH)
        # grouped tile order so consecutive programs share weight tiles in L2
        group = GROUP_M * num_n
        gid = pid // group
        first_m = gid * GROUP_M
        gm = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % gm
        pid_n = (pid % group) // gm

        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_j = pid_n * BNH + tl.arange(0, BNH)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        j_ok = offs_j < NH

        k_iters = tl.cdiv(K, BK)
        per = tl.cdiv(k_iters, SPLIT_K)
        it0 = pid_k * per
        it1 = min(it0 + per, k_iters)

        # weights are read as int32 words (4 K-consecutive packed bytes: 16-byte vector loads) and
        # unpacked with word-wide bit operations; only the final int8 tile is per element
        BK4: tl.constexpr = BK // 4
        offs_k4 = tl.arange(0, BK4)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BK, BM]
        w_ptrs = qw_ptr.to(tl.pointer_type(tl.int32)) + offs_j[:, None] * (K // 4) + offs_k4[None, :]  # [BNH, BK/4]
        wb_ptrs = qw_ptr.to(tl.pointer_type(tl.int8)) + offs_j[:, None] * K + offs_k[None, :]  # [BNH, BK] bytes (BYTES)
        acc_lo = tl.zeros([BNH, BM], dtype=tl.int32)
        acc_hi = tl.zeros([BNH, BM], dtype=tl.int32)
        if GROUPED:
            # level-1 (s1, sz) are byte loads that the pipeliner does not stage: prefetch them one
            # iteration ahead by hand so the loop never waits on their latency
            # (group index clamped to the last group: always a valid address, no extra mask)
            if META:  # (s1, sz) of rows j and j + N/2 in one int32 word: [K/G, N/2] (`pack_group_meta`)
                meta_n = tl.load(gs_ptr.to(tl.pointer_type(tl.int32)) + tl.minimum((it0 * BK) // GS, (K - 1) // GS) * NH
                                 + offs_j, mask=j_ok, other=0)
            else:
                g_off = tl.minimum((it0 * BK) // GS, (K - 1) // GS) * N + offs_j
                g_ok = j_ok
                s_lo_n = tl.load(gs_ptr + g_off, mask=g_ok, other=0)
                z_lo_n = tl.load(gz_ptr + g_off, mask=g_ok, other=0)
                s_hi_n = tl.load(gs_ptr + g_off + NH, mask=g_ok, other=0)
                z_hi_n = tl.load(gz_ptr + g_off + NH, mask=g_ok, other=0)
        if XSUM_DOT:
            ones = tl.full([BNH, BK], 1, dtype=tl.int8)
        for it in range(it0, it1):
            kb = it * BK
            if EVEN_K:
                xt = tl.load(x_ptrs + kb, mask=m_ok[None, :], other=0)
                if W8:  # INT8 weights [N, K] (`natix.kernels.w4a8_expand`): rows j and j + N/2 as two tiles
                    lo8 = tl.load(wb_ptrs + kb, mask=j_ok[:, None], other=0)
                    hi8 = tl.load(wb_ptrs + NH * K + kb, mask=j_ok[:, None], other=0)
                elif BYTES:
                    wb = tl.load(wb_ptrs + kb, mask=j_ok[:, None], other=0)
                else:
                    wq = tl.load(w_ptrs + kb // 4, mask=j_ok[:, None], other=0)
            else:
                k_ok = (kb + offs_k) < K
                xt = tl.load(x_ptrs + kb, mask=m_ok[None, :] & k_ok[:, None], other=0)
                if W8:
                    lo8 = tl.load(wb_ptrs + kb, mask=j_ok[:, None] & k_ok[None, :], other=0)
                    hi8 = tl.load(wb_ptrs + NH * K + kb, mask=j_ok[:, None] & k_ok[None, :], other=0)
                elif BYTES:
                    wb = tl.load(wb_ptrs + kb, mask=j_ok[:, None] & k_ok[None, :], other=0)
                else:
                    wq = tl.load(w_ptrs + kb // 4, mask=j_ok[:, None] & ((kb + 4 * offs_k4) < K)[None, :], other=0)
            if GROUPED:
                # this block's level-1 (s1, sz), then the next block's loads (one iteration ahead)
                if META:
                    s_lo = (meta_n & 0xFF)[:, None]
                    z_lo = ((meta_n >> 8) & 0xFF)[:, None]
                    s_hi = ((meta_n >> 16) & 0xFF)[:, None]
                    z_hi = ((meta_n >> 24) & 0xFF)[:, None]
                    meta_n = tl.load(gs_ptr.to(tl.pointer_type(tl.int32)) + tl.minimum(((it + 1) * BK) // GS, (K - 1) // GS)
                                     * NH + offs_j, mask=j_ok, other=0)
                else:
                    s_lo = s_lo_n.to(tl.int32)[:, None]
                    z_lo = z_lo_n.to(tl.int32)[:, None]
                    s_hi = s_hi_n.to(tl.int32)[:, None]
                    z_hi = z_hi_n.to(tl.int32)[:, None]
                    g_off = tl.minimum(((it + 1) * BK) // GS, (K - 1) // GS) * N + offs_j
                    g_ok = j_ok
                    s_lo_n = tl.load(gs_ptr + g_off, mask=g_ok, other=0)
                    z_lo_n = tl.load(gz_ptr + g_off, mask=g_ok, other=0)
                    s_hi_n = tl.load(gs_ptr + g_off + NH, mask=g_ok, other=0)
                    z_hi_n = tl.load(gz_ptr + g_off + NH, mask=g_ok, other=0)
            if W8:
                pass  # lo8 / hi8 are the MMA operands as loaded
            elif BYTES:
                # raw codes (per channel, or level 1 after the dot) straight from bytes: the nibble
                # masks act on packed byte registers, no regrouping of words into the MMA operand
                lo8 = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [wb], dtype=tl.int8,
                                                is_pure=True, pack=4)
                hi8 = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
                                                "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)
            elif GROUP_EPI:
                # BK == GS: one group per K-block, so level 1 applies to the block's dot instead of to
                # every weight: sum_k x (q4 s1 - sz) = s1 * (x . q4) - sz * sum_k x. The raw UINT4
                # codes go to the tensor cores as in the per-channel path; each term stays below
                # 15 * 127 * 128 * 255 < 2^31, and their difference is the block's exact INT8 sum
                lo = wq & 0x0F0F0F0F
                hi = (wq >> 4) & 0x0F0F0F0F
            elif GROUPED:
                # level 1, QServe-style subtraction after multiplication, two codes per 16-bit lane:
                # lane = q4 * s1 + (256 - sz) <= 15*255 + 256 never carries into the next lane and its
                # low byte is (q4 * s1 - sz) mod 256, i.e. the INT8 weight
                c_lo = (256 - z_lo) * 0x10001
                c_hi = (256 - z_hi) * 0x10001
                # low bytes of the 16-bit lanes: even (bytes 0, 2) | odd (bytes 1, 3) << 8
                e = (wq & 0x000F000F) * s_lo + c_lo
                o = ((wq >> 8) & 0x000F000F) * s_lo + c_lo
                lo = (e & 0x00FF00FF) | ((o & 0x00FF00FF) << 8)
                e = ((wq >> 4) & 0x000F000F) * s_hi + c_hi
                o = ((wq >> 12) & 0x000F000F) * s_hi + c_hi
                hi = (e & 0x00FF00FF) | ((o & 0x00FF00FF) << 8)
            else:
                lo = wq & 0x0F0F0F0F
                hi = (wq >> 4) & 0x0F0F0F0F
            if not BYTES and not W8:
                # int32 [BNH, BK/4] (little-endian bytes along K) -> int8 [BNH, BK]
                lo8 = tl.reshape(tl.join(tl.join(lo.to(tl.int8), (lo >> 16).to(tl.int8)),
                                         tl.join((lo >> 8).to(tl.int8), (lo >> 24).to(tl.int8))), (BNH, BK))
                hi8 = tl.reshape(tl.join(tl.join(hi.to(tl.int8), (hi >> 16).to(tl.int8)),
                                         tl.join((hi >> 8).to(tl.int8), (hi >> 24).to(tl.int8))), (BNH, BK))
            if GROUP_EPI:
                if XSUM_DOT:  # the block's sum of codes on the tensor cores, already in the accumulator's layout
                    xsum_g = tl.dot(ones, xt, out_dtype=tl.int32)  # [BNH, BM], every row the same
                else:
                    xsum_g = tl.sum(xt.to(tl.int32), axis=0)[None, :]  # [1, BM]: this block's sum of codes
                acc_lo += s_lo * tl.dot(lo8, xt, out_dtype=tl.int32) - z_lo * xsum_g
                acc_hi += s_hi * tl.dot(hi8, xt, out_dtype=tl.int32) - z_hi * xsum_g
            else:
                acc_lo = tl.dot(lo8, xt, acc_lo, out_dtype=tl.int32)
                acc_hi = tl.dot(hi8, xt, acc_hi, out_dtype=tl.int32)

        n_lo = offs_j
        n_hi = offs_j + NH
        mask2 = j_ok[:, None] & m_ok[None, :]
        do_epilogue = True
        if SPLIT_K > 1:
            MN = M * N
            p_lo = part_ptr + pid_k * MN + offs_m[None, :] * N + n_lo[:, None]
            tl.store(p_lo, acc_lo, mask=mask2)
            tl.store(p_lo + NH, acc_hi, mask=mask2)
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            do_epilogue = ticket == SPLIT_K - 1
            if do_epilogue:
                acc_lo = tl.zeros([BNH, BM], dtype=tl.int32)
                acc_hi = tl.zeros([BNH, BM], dtype=tl.int32)
                base = part_ptr + offs_m[None, :] * N + n_lo[:, None]
                for s in tl.static_range(SPLIT_K):
                    acc_lo += tl.load(base + s * MN, mask=mask2, other=0, cache_modifier=".cg")
                    acc_hi += tl.load(base + s * MN + NH, mask=mask2, other=0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid, 0)
        if do_epilogue:
            if not GROUPED and not W8:
                xsum = tl.load(xsum_ptr + offs_m, mask=m_ok, other=0)
                z_lo = tl.load(wz_ptr + n_lo, mask=j_ok, other=0).to(tl.int32)
                z_hi = tl.load(wz_ptr + n_hi, mask=j_ok, other=0).to(tl.int32)
                acc_lo -= z_lo[:, None] * xsum[None, :]
                acc_hi -= z_hi[:, None] * xsum[None, :]
            o_lo = out_ptr + offs_m[None, :] * stride_om + n_lo[:, None]
            o_hi = out_ptr + offs_m[None, :] * stride_om + n_hi[:, None]
            if RAW_OUT:
                tl.store(o_lo, acc_lo, mask=mask2)
                tl.store(o_hi, acc_hi, mask=mask2)
            else:
                xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
                s_lo = tl.load(ws_ptr + n_lo, mask=j_ok, other=0.0)
                s_hi = tl.load(ws_ptr + n_hi, mask=j_ok, other=0.0)
                y_lo = acc_lo.to(tl.float32) * xs[None, :] * s_lo[:, None]
                y_hi = acc_hi.to(tl.float32) * xs[None, :] * s_hi[:, None]
                if HAS_BIAS:
                    y_lo += tl.load(bias_ptr + n_lo, mask=j_ok, other=0.0).to(tl.float32)[:, None]
                    y_hi += tl.load(bias_ptr + n_hi, mask=j_ok, other=0.0).to(tl.float32)[:, None]
                tl.store(o_lo, y_lo.to(out_ptr.dtype.element_ty), mask=mask2)
                tl.store(o_hi, y_hi.to(out_ptr.dtype.element_ty), mask=mask2)

    return w4a8_kernel


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def w4a8_gemm_triton(
    x_q: torch.Tensor, x_scale: torch.Tensor, x_sum: Optional[torch.Tensor], w: W4A8Weight,
    bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16, config: Optional[dict] = None,
) -> torch.Tensor:
    """Launch the Triton kernel. x_q int8 [M, K] (row stride free, K contiguous), x_scale float32 [M],
    x_sum int32 [M] (per-channel variant only). Returns [M, N] out_dtype (int32 = raw accumulator)."""
    m, k = x_q.shape
    n = w.n
    grouped = w.group_scale is not None
    _check(x_q, x_scale, x_sum, w, bias, out_dtype)
    cfg = dict(config) if config else get_config(m, n, k, grouped, x_q.device)
    cfg["BK"] = fit_block_k(cfg["BK"], w.group_size)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    num_m, num_n = -(-m // cfg["BM"]), -(-(n // 2) // cfg["BNH"])
    split = int(cfg["SPLIT_K"])
    part = torch.empty((split, m, n), dtype=torch.int32, device=x_q.device) if split > 1 else out
    cnt = _counters(x_q.device, num_m * num_n)
    epi = group_epilogue(cfg, w.group_size)
    dummy = w.scale
    _kernel()[(num_m * num_n, split)](
        x_q, x_scale, x_sum if x_sum is not None else dummy, w.qweight, w.scale,
        w.group_scale if grouped else dummy, w.group_zero if grouped else dummy,
        w.zero if not grouped else dummy, bias if bias is not None else dummy, out, part, cnt,
        m, n, k, x_q.stride(0), out.stride(0),
        GROUPED=grouped, HAS_BIAS=bias is not None, RAW_OUT=out_dtype == torch.int32, EVEN_K=k % cfg["BK"] == 0,
        BM=cfg["BM"], BNH=cfg["BNH"], BK=cfg["BK"], SPLIT_K=split, GROUP_M=cfg.get("GROUP_M", 8),
        GS=w.group_size or GROUP_SIZE, GROUP_EPI=epi, BYTES=byte_unpack(grouped, epi),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out


def group_epilogue(cfg: dict, group_size: int) -> bool:
    """Whether progressive weights in groups of ``group_size`` (0: per channel) apply level 1 to
    each K-block's dot (``s1 * (x . q4) - sz * sum x``: no per-weight dequantization; needs
    ``BK == group_size``) rather than to every weight before the dot. Measured on the H200 at
    the Llama-3-8B shapes (reports/kernels_notes.md, run h200-s19b): 3-11% faster for g128 at M <= 16,
    1.3-2.5x slower at M >= 64 (the dot can no longer accumulate in place: every block's product is
    scaled on the CUDA cores before it is added), so by default only for tiles of BM <= 16. A config
    may say ``GROUP_EPI``; ``NATIX_W4A8_GROUP_EPI=0/1`` overrides both (for A/B timing)."""
    if not group_size or cfg["BK"] != group_size:
        return False
    env = os.environ.get("NATIX_W4A8_GROUP_EPI")
    if env in ("0", "1"):
        return env == "1"
    return bool(cfg.get("GROUP_EPI", cfg["BM"] <= 16))


def byte_unpack(grouped: bool, epi: bool) -> bool:
    """Whether the kernel unpacks raw UINT4 codes (per channel, or progressive with level 1 after the
    dot) with inline PTX on packed byte registers (``BYTES``): ``and``/``shr`` on 32-bit registers that
    already hold four K-consecutive bytes of the MMA operand. Triton's own ops would extract each byte
    and pack them again (4 SHF + 3 PRMT per word): the main loop at M <= 16 drops from 241 to 146 SASS
    instructions per channel, 321 to 235 for g128 (sm_90, Triton 3.9 offline compile). Inline PTX does
    not run in the Triton interpreter, so there (and with ``NATIX_W4A8_BYTES=0``, for A/B timing) the
    word-wide path runs; the GPU tests cover this one."""
    if grouped and not epi:
        return False
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("NATIX_W4A8_BYTES", "1") != "0"


def xsum_on_tensor_cores() -> bool:
    """Whether level 1 after the dot (`group_epilogue`) takes each K-block's sum of activation codes
    from a dot with a tile of ones (``XSUM_DOT``: one more MMA, its result already in the
    accumulator's layout) instead of a reduction across the tile's threads, whose result then goes
    through shared memory to the accumulator's layout every block. ``NATIX_W4A8_XSUM_DOT=0`` turns
    it off (for A/B timing)."""
    return os.environ.get("NATIX_W4A8_XSUM_DOT", "1") != "0"


def fit_block_k(bk: int, group_size: int) -> int:
    """The K-block a tuned config's ``bk`` becomes for weights in groups of ``group_size`` (0: per
    channel): the kernel reads one level-1 (s1, sz) per K-block, so the block must divide the group.
    The tuned tables hold g128 tiles; a smaller group keeps their M/N tiles with a shorter K-block."""
    return group_size if group_size and group_size % bk else bk


def _check(x_q, x_scale, x_sum, w: W4A8Weight, bias, out_dtype) -> None:
    w.validate()
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.stride(1) != 1:
        raise ValueError(f"x_q must be int8 [M, K] with unit K stride, got {x_q.dtype} {tuple(x_q.shape)} {x_q.stride()}")
    m, k = x_q.shape
    if k != w.k:
        raise ValueError(f"K mismatch: activations K={k}, weight K={w.k}")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (m,) or not x_scale.is_contiguous():
        raise ValueError(f"x_scale must be contiguous float32 [{m}]")
    if w.group_scale is None and (x_sum is None or x_sum.dtype != torch.int32 or tuple(x_sum.shape) != (m,)):
        raise ValueError("the per-channel variant needs x_sum int32 [M] (per-token sum of INT8 codes)")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.int32):
        raise ValueError(f"out_dtype must be fp16/bf16/fp32/int32, got {out_dtype}")
    if bias is not None and (tuple(bias.shape) != (w.n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{w.n}]")
    if k % 4 or w.qweight.data_ptr() % 4:
        raise ValueError("the kernel reads qweight rows as int32 words: K % 4 == 0 and a 4-byte aligned qweight")
    if m * w.n >= 2**31:
        raise ValueError("M * N must be < 2**31 (int32 indexing)")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("natix::w4a8_gemm", mutates_args=())
def _w4a8_gemm_op(
    x_q: torch.Tensor, x_scale: torch.Tensor, x_sum: Optional[torch.Tensor], qweight: torch.Tensor,
    scale: torch.Tensor, group_scale: Optional[torch.Tensor], group_zero: Optional[torch.Tensor],
    zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_dtype: torch.dtype,
) -> torch.Tensor:
    w = W4A8Weight(qweight, scale, group_scale, group_zero, zero)
    if _use_triton(x_q):
        return w4a8_gemm_triton(x_q, x_scale, x_sum, w, bias, out_dtype)
    _check(x_q, x_scale, x_sum, w, bias, out_dtype)
    return w4a8_gemm_reference(x_q, x_scale, w, bias, out_dtype)


@_w4a8_gemm_op.register_fake
def _(x_q, x_scale, x_sum, qweight, scale, group_scale, group_zero, zero, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], qweight.shape[0] * 2), dtype=out_dtype)


def w4a8_gemm(
    x_q: torch.Tensor, x_scale: torch.Tensor, w: W4A8Weight, x_sum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """[M, N] = dequant(x_q [M, K] int8, x_scale [M]) @ dequant(w)^T (+ bias [N]).

    ``x_sum`` int32 [M] is required for per-channel weights. ``out_dtype=torch.int32`` returns the
    exact integer accumulator (after the per-channel zero correction) instead of the float output.
    """
    return torch.ops.natix.w4a8_gemm(
        x_q, x_scale, x_sum, w.qweight, w.scale, w.group_scale, w.group_zero, w.zero, bias, out_dtype
    )
