"""RoPE on q and k, and the KV-cache write, in one launch per step and layer.

The same arithmetic as `natix.kernels.rope.rope_` followed by `natix.kernels.kv4_cache.kv4_write`
(UINT4 cache) or `natix.kernels.paged_attention.paged_write` (16-bit cache): one program per token
rotates its query and key heads in place (rounded to the tensors' dtype, as the separate kernels
store them), then writes the rotated keys and the values at the token's slot (slot < 0: rope only).
Rope's pairs ``(x[i], x[i + D/2])`` are exactly the two halves KV4 packs into one byte's nibbles,
so the rotated halves go straight into the codes.

Head rotation (``rotation``: w4a8kv4 ``rotate_keys``, ``H = natix.quant.qoq.head_rotation(D)`` as
float32 ``[D, D]``): after RoPE, each query and key head row ``x [D]`` becomes ``x H`` (written back
in place of q and k, and the keys' ``k H`` is what the cache stores; values are not rotated). The
arithmetic is the separate path's (``rope``, then ``(x.float() @ H).to(dtype)``, then the write):
the RoPE result is rounded to the tensors' dtype first, the product is taken in float32 on those
rounded values and rounded to the dtype again, and the write quantizes that. The kernel computes
the product as four ``[heads, D/2] x [D/2, D/2]`` float32 ``tl.dot`` (IEEE precision, not TF32) over
the row halves, with ``H`` loaded once per program; it needs a power-of-two ``D >= 32``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .kv4_cache import KV4Cache, kv4_write_reference
from .paged_attention import paged_write_reference
from .rope import rope_reference


def rope_cache_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                               cos_sin: torch.Tensor, slots: torch.Tensor, kv4: Optional[KV4Cache] = None,
                               k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
                               rotation: Optional[torch.Tensor] = None) -> None:
    """What :func:`rope_cache_write` computes, in torch ops: RoPE in place; with ``rotation`` ``H``,
    ``q <- (q.float() @ H).to(q.dtype)`` and the same for k, in place; then the write of k, v."""
    rope_reference(q, k, positions, cos_sin)
    if rotation is not None:
        _check_rotation(rotation, q, k, kernel=False)
        q.copy_((q.float() @ rotation).to(q.dtype))
        k.copy_((k.float() @ rotation).to(k.dtype))
    if kv4 is not None:
        kv4_write_reference(kv4, k, v, slots)
    else:
        paged_write_reference(k_cache, v_cache, k, v, slots)


def _check_rotation(rotation: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kernel: bool) -> None:
    """``rotation`` must be float32 ``[D, D]`` on q's device (and, for the kernel, contiguous with a
    power-of-two ``D >= 32``: ``tl.dot`` tiles of ``D/2``)."""
    d = q.shape[-1]
    if not isinstance(rotation, torch.Tensor) or rotation.dtype != torch.float32 or tuple(rotation.shape) != (d, d):
        got = (tuple(rotation.shape), rotation.dtype) if isinstance(rotation, torch.Tensor) else type(rotation).__name__
        raise ValueError(f"rotation must be a float32 [{d}, {d}] tensor (head_dim {d}), got {got}")
    if rotation.device != q.device:
        raise ValueError(f"rotation is on {rotation.device}, q on {q.device}")
    if k.shape[-1] != d:
        raise ValueError(f"q head_dim {d} and k head_dim {k.shape[-1]} differ")
    if kernel:
        if d < 32 or d & (d - 1):
            raise ValueError(f"head_dim={d}: the fused rotation needs a power of two >= 32 "
                             "(rope_cache_write_reference takes any head_dim)")
        if not rotation.is_contiguous():
            raise ValueError("rotation must be contiguous")


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    from .kv4_cache import store_helper

    globals().update(kv4_store=store_helper())

    @triton.jit
    def rope_cache_write_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, rot_ptr, c0, c1, c2, c3, c4, c5,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        HQ: tl.constexpr, HK: tl.constexpr, HP: tl.constexpr, HKP: tl.constexpr, HALF: tl.constexpr,
        PAGE: tl.constexpr, KV4: tl.constexpr, NG: tl.constexpr, ROT: tl.constexpr, ROT_SIGNS: tl.constexpr, ROT_SCALE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF)
        c = tl.load(cs_ptr + pos * (2 * HALF) + d)[None, :]
        s = tl.load(cs_ptr + pos * (2 * HALF) + HALF + d)[None, :]
        dt = q_ptr.dtype.element_ty
        if ROT:
            # H [2 HALF, 2 HALF] (row-major) as four [HALF, HALF] blocks, loaded once for q and k:
            # x H = [x_lo H_ll + x_hi H_hl, x_lo H_lh + x_hi H_hh]
            hb = rot_ptr + d[:, None] * (2 * HALF) + d[None, :]
            h_ll = tl.load(hb)
            h_lh = tl.load(hb + HALF)
            h_hl = tl.load(hb + HALF * (2 * HALF))
            h_hh = tl.load(hb + HALF * (2 * HALF) + HALF)
        # queries: rotate in place
        h = tl.arange(0, HP)
        qb = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
        qok = (h < HQ)[:, None]
        x1 = tl.load(qb, mask=qok, other=0.0).to(tl.float32)
        x2 = tl.load(qb + HALF, mask=qok, other=0.0).to(tl.float32)
        q_lo = (x1 * c - x2 * s).to(dt)
        q_hi = (x2 * c + x1 * s).to(dt)
        if ROT:  # on the dtype-rounded RoPE result, in float32, rounded again (the separate path's arithmetic)
            if ROT_SIGNS:  # 16-bit dots against the +-1 matrix (exact products), float32 sums, then the scale
                q_lo, q_hi = (((tl.dot(q_lo, h_ll) + tl.dot(q_hi, h_hl)) * ROT_SCALE).to(dt),
                                ((tl.dot(q_lo, h_lh) + tl.dot(q_hi, h_hh)) * ROT_SCALE).to(dt))
            else:
                a = q_lo.to(tl.float32)
                b = q_hi.to(tl.float32)
                q_lo = (tl.dot(a, h_ll, input_precision="ieee") + tl.dot(b, h_hl, input_precision="ieee")).to(dt)
                q_hi = (tl.dot(a, h_lh, input_precision="ieee") + tl.dot(b, h_hh, input_precision="ieee")).to(dt)
        tl.store(qb, q_lo, mask=qok)
        tl.store(qb + HALF, q_hi, mask=qok)
        # keys: rotate in place (rounded to the tensor dtype, as the separate rope kernel stores them)
        hk = tl.arange(0, HKP)
        kok = (hk < HK)[:, None]
        kb = k_ptr + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
        x1 = tl.load(kb, mask=kok, other=0.0).to(tl.float32)
        x2 = tl.load(kb + HALF, mask=kok, other=0.0).to(tl.float32)
        k_lo = (x1 * c - x2 * s).to(dt)
        k_hi = (x2 * c + x1 * s).to(dt)
        if ROT:
            if ROT_SIGNS:  # 16-bit dots against the +-1 matrix (exact products), float32 sums, then the scale
                k_lo, k_hi = (((tl.dot(k_lo, h_ll) + tl.dot(k_hi, h_hl)) * ROT_SCALE).to(dt),
                                ((tl.dot(k_lo, h_lh) + tl.dot(k_hi, h_hh)) * ROT_SCALE).to(dt))
            else:
                a = k_lo.to(tl.float32)
                b = k_hi.to(tl.float32)
                k_lo = (tl.dot(a, h_ll, input_precision="ieee") + tl.dot(b, h_hl, input_precision="ieee")).to(dt)
                k_hi = (tl.dot(a, h_lh, input_precision="ieee") + tl.dot(b, h_hh, input_precision="ieee")).to(dt)
        tl.store(kb, k_lo, mask=kok)
        tl.store(kb + HALF, k_hi, mask=kok)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            vb = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
            v_lo = tl.load(vb, mask=kok, other=0.0)
            v_hi = tl.load(vb + HALF, mask=kok, other=0.0)
            row = ((slot // PAGE) * HK + hk) * PAGE + slot % PAGE  # [HKP]
            if KV4:
                # c0..c5 = k codes, v codes, k scale, k zero, v scale, v zero (kv4_cache's layout)
                ok = hk < HK
                kv4_store(k_lo.to(tl.float32), k_hi.to(tl.float32), c0, c2, c3, row, ok, HKP, HALF, NG)  # noqa: F821
                kv4_store(v_lo.to(tl.float32), v_hi.to(tl.float32), c1, c4, c5, row, ok, HKP, HALF, NG)  # noqa: F821
            else:
                # c0, c1 = k, v pages [P, H, page, 2 * HALF] in the cache dtype
                o = row[:, None] * (2 * HALF) + d[None, :]
                ct = c0.dtype.element_ty
                tl.store(c0 + o, k_lo.to(ct), mask=kok)
                tl.store(c0 + o + HALF, k_hi.to(ct), mask=kok)
                tl.store(c1 + o, v_lo.to(ct), mask=kok)
                tl.store(c1 + o + HALF, v_hi.to(ct), mask=kok)

    return rope_cache_write_kernel


@functools.lru_cache(maxsize=None)
def _launcher(hq: int, hk: int, half: int, page: int, kv4: bool, rot: bool = False, signs: bool = False,
              scale: float = 1.0, groups: int = 1):
    import triton

    from .launch import Launcher

    # tl.dot takes tiles of at least 16 rows: with the rotation the head tiles are padded (masked) to 16
    lo = 16 if rot else 1
    return Launcher(_kernel(), HQ=hq, HK=hk, HP=max(lo, triton.next_power_of_2(hq)),
                    HKP=max(lo, triton.next_power_of_2(hk)), HALF=half, PAGE=page, KV4=kv4, NG=groups, ROT=rot, ROT_SIGNS=signs,
                    ROT_SCALE=scale, num_warps=4)


def _sign_form(rotation: torch.Tensor, dtype: torch.dtype) -> Optional[tuple[torch.Tensor, float]]:
    """``(S in dtype, c)`` with ``rotation == c S`` and ``S`` of +-1, or None; computed once and kept
    on the tensor (the engine passes one rotation for its lifetime)."""
    forms = rotation.__dict__.setdefault("_natix_sign_forms", {})
    if (dtype, rotation._version) not in forms:
        c = float(rotation.abs().max())
        signs = torch.sign(rotation)
        exact = c > 0 and bool((signs != 0).all()) and bool(((signs * c - rotation).abs() <= 1e-6 * c).all())
        forms[dtype, rotation._version] = (signs.to(dtype).contiguous(), c) if exact else None
    return forms[dtype, rotation._version]


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     slots: torch.Tensor, kv4: Optional[KV4Cache] = None, k_cache: Optional[torch.Tensor] = None,
                     v_cache: Optional[torch.Tensor] = None, rotation: Optional[torch.Tensor] = None) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by ``positions [T]`` (``cos_sin`` as in
    `natix.kernels.rope`) and store k, ``v [T, Hkv, D]`` at ``slots [T]`` in ``kv4`` or in the 16-bit
    ``k_cache`` / ``v_cache``. With ``rotation`` (float32 ``[D, D]``) q and k are multiplied by it after
    RoPE (module docstring), in the same launch. Shapes are the caller's to check (the engine checks
    them at load); the rotation's are checked here (host-side metadata only)."""
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        rope_cache_write_reference(q, k, v, positions, cos_sin, slots, kv4, k_cache, v_cache, rotation)
        return
    if rotation is not None:
        _check_rotation(rotation, q, k, kernel=True)
    t = q.shape[0]
    if t == 0:
        return
    if kv4 is not None:
        tensors, page = kv4.tensors(), kv4.page_size
    else:
        tensors, page = (k_cache, v_cache, k_cache, k_cache, k_cache, k_cache), k_cache.shape[2]
    signs, scale, rot = None, 1.0, q
    if rotation is not None:
        rot = rotation
        # (Triton 3.x's interpreter computes bfloat16 dots wrongly, numpy having no bfloat16: it takes
        # the float32 path there; fp16 runs the 16-bit path under the interpreter, bf16 on GPUs)
        interp_bf16 = q.dtype == torch.bfloat16 and not q.is_cuda
        if q.dtype in (torch.float16, torch.bfloat16) and not interp_bf16:
            form = _sign_form(rotation, q.dtype)
            if form is not None:
                rot, scale = form
                signs = True
    groups = kv4.num_groups if kv4 is not None else 1
    _launcher(q.shape[1], k.shape[1], q.shape[2] // 2, page, kv4 is not None, rotation is not None, bool(signs), scale,
              groups)(
        (t,), q, k, v, positions, cos_sin, slots, rot, *tensors, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1))
