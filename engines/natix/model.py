"""The natix engine's own Llama-family decoder, over a paged KV cache.

Per layer (W4A8KV4; dense and FP8 differ only where marked):

    x      = add_rmsnorm(h, delta, γ_in)          residual add + norm (+ INT8 quant for W4A8), in place on h
    qkv    = QKV(x)                                one GEMM for q, k and v
    rope(q, k); write(k, v) -> cache               one launch; KV4: quantize on write
                                                   (rotate_keys: q·H and k·H too, same launch)
    a      = attention(q, cache | k, v)            decode: paged kernel; prefill: varlen flash / SDPA
    delta  = O(a)                                  (W4A8: per-token INT8 quant of a first)
    x      = add_rmsnorm(h, delta, γ_post)
    delta  = Down(silu_mul(GateUp(x)))             (W4A8: the activation kernel quantizes)

``forward`` takes a :class:`Batch` of flattened tokens (prefill: whole prompts, or the uncached
rest of a prompt whose first pages are shared; decode: one token per sequence) and returns the
logits of the rows that sample. Decode is a pure function of fixed-shape tensors (no host sync, no
data-dependent Python), which is what lets the runner capture it in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from natix.engines.natix.kv_cache import PagedKVCache
from natix.engines.natix.layers import Ops, VocabTables, make_linear
from natix.engines.natix.weights import ModelWeights


@dataclass
class Batch:
    """One forward's inputs (tensors on the model's device unless said).

    All steps: ``input_ids`` / ``positions`` / ``slots`` [T] (slot = page * page_size + offset of
    each token's KV), ``logits_rows`` [S] (rows of T whose next-token logits are wanted) or None for
    all rows. Decode: ``block_tables`` int32 [B, max_pages], ``seq_lens`` int32 [B] (tokens in the
    cache including this step's). Prefill (host-side lists): ``new_lens`` tokens computed per
    sequence, ``ctx_lens`` tokens already cached before them, ``pages`` each sequence's page list,
    ``cu_seqlens`` int32 [S + 1] (device) over ``new_lens``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    is_prefill: bool
    logits_rows: Optional[torch.Tensor] = None
    block_tables: Optional[torch.Tensor] = None
    seq_lens: Optional[torch.Tensor] = None
    new_lens: Optional[list[int]] = None
    ctx_lens: Optional[list[int]] = None
    pages: Optional[list[list[int]]] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_len: int = 0  # decode: an upper bound of seq_lens (sizes the attention's split count)
    _plan: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = None

    def context_plan(self, page_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Prefill with cached context: (every context page, in sequence order; the rows of
        ``cat([gathered context, new tokens])`` that pack each sequence as [its ctx_lens cached tokens,
        its new_lens new ones]; the cumulative key lengths int32 [S + 1]; the longest sequence), built on
        first use and kept for the forward's other layers."""
        if self._plan is None:
            assert self.new_lens is not None and self.ctx_lens is not None and self.pages is not None
            flat: list[int] = []
            for ctx, pages in zip(self.ctx_lens, self.pages):
                flat += pages[: -(-ctx // page_size)] if ctx else []
            n_ctx = len(flat) * page_size  # the gathered context rows come first, the new tokens after
            rows: list[int] = []
            cu = [0]
            off = start = 0
            for n, ctx in zip(self.new_lens, self.ctx_lens):
                rows += range(off, off + ctx)
                off += -(-ctx // page_size) * page_size
                rows += range(n_ctx + start, n_ctx + start + n)
                start += n
                cu.append(cu[-1] + ctx + n)
            t = torch.tensor(flat + rows + cu, dtype=torch.long)
            t = (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
            self._plan = (t[:len(flat)], t[len(flat):len(flat) + len(rows)], t[len(flat) + len(rows):].to(torch.int32),
                          max(c + n for c, n in zip(self.ctx_lens, self.new_lens)))
        return self._plan


class DecoderModel:
    def __init__(self, weights: ModelWeights, kv_kind: str, prefill_attention: str, max_model_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        from natix.kernels.rope import cos_sin_table

        self.spec = s = weights.spec
        self.device, self.dtype = device, dtype
        self.ops = Ops(device)
        self.int8_act = weights.scheme == "w4a8kv4"
        self.kv_kind = kv_kind
        self.prefill_quantized = prefill_attention == "quantized"
        self.max_model_len = max_model_len
        self.norm = weights.norm
        # dense, or int8 rows (w4a8kv4 embed_bits / lm_head_bits = 8): 8-bit on CUDA, dequantized once on CPU
        self.vocab = VocabTables(weights.embed, weights.lm_head, self.ops, dtype)
        self.embed, self.lm_head = self.vocab.embed, self.vocab.lm_head
        self.layers = []
        for i, L in enumerate(weights.layers):
            mk = lambda lw, nm: make_linear(lw, self.ops, dtype, f"layer {i} {nm}")  # noqa: E731
            self.layers.append((L.input_norm, L.post_norm, mk(L.qkv, "qkv"), mk(L.o, "o_proj"),
                                mk(L.gate_up, "gate_up"), mk(L.down, "down_proj")))
        inv_freq, scaling = weights.rope
        self.cos_sin = cos_sin_table(inv_freq.to(device), max_model_len, scaling)
        self.sm_scale = 1.0 / math.sqrt(s.head_dim)
        # w4a8kv4 rotate_keys: q and k rotated by the head Hadamard after RoPE (q·kᵀ unchanged), so
        # the KV4 cache quantizes rotated keys; with a 16-bit cache it would change nothing
        self.key_rotation: Optional[torch.Tensor] = None
        if weights.rotate_keys and kv_kind == "int4":
            from natix.quant.qoq import head_rotation

            self.key_rotation = head_rotation(s.head_dim).to(device=device, dtype=torch.float32)
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch, kv: PagedKVCache) -> torch.Tensor:
        """Logits [S, vocab] (model dtype) of ``batch.logits_rows`` (all rows if None)."""
        s = self.spec
        t = batch.input_ids.shape[0]
        h = self.vocab.embedding(batch.input_ids)  # the residual stream [T, D]
        delta: Optional[torch.Tensor] = None
        qw, kw = s.q_width, s.kv_width
        for li, (g_in, g_post, qkv_l, o_l, gu_l, down_l) in enumerate(self.layers):
            x = self.ops.add_rmsnorm(h, delta, g_in, s.rms_eps, self.int8_act)
            qkv = qkv_l.quantized(x) if self.int8_act else qkv_l(x)
            q = qkv[:, :qw].view(t, s.heads, s.head_dim)
            k = qkv[:, qw:qw + kw].view(t, s.kv_heads, s.head_dim)
            v = qkv[:, qw + kw:].view(t, s.kv_heads, s.head_dim)
            self._rope_write(kv, li, q, k, v, batch)
            if batch.is_prefill:
                a = self._prefill_attention(kv, li, q, k, v, batch)
            else:
                a = self._decode_attention(kv, li, q, batch)
            delta = o_l(a.reshape(t, qw))
            x = self.ops.add_rmsnorm(h, delta, g_post, s.rms_eps, self.int8_act)
            gu = gu_l.quantized(x) if self.int8_act else gu_l(x)
            delta = down_l.quantized(self.ops.silu_mul(gu, True)) if self.int8_act else down_l(self.ops.silu_mul(gu, False))
        if batch.logits_rows is not None:
            h, delta = h[batch.logits_rows], delta[batch.logits_rows]  # type: ignore[index]
        x = self.ops.add_rmsnorm(h, delta, self.norm, s.rms_eps, False)
        return self.vocab.logits(x)

    # ------------------------------------------------------------------------------ KV cache
    def _rope_write(self, kv: PagedKVCache, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    batch: Batch) -> None:
        """RoPE on q and k in place, and k, v into the cache (one launch on CUDA). rotate_keys (KV4
        cache only): the same launch also rotates q and k by ``key_rotation`` after RoPE (q ← q H,
        k ← k H in place, a float32 product rounded to the model dtype) and writes the rotated keys."""
        from natix.kernels.rope_cache_write import rope_cache_write, rope_cache_write_reference

        c = kv.layer_caches[li]
        caches = {"kv4": c} if kv.kind == "int4" else {"k_cache": c[0], "v_cache": c[1]}
        if self.key_rotation is not None:
            caches["rotation"] = self.key_rotation
        fn = rope_cache_write if self.ops.gpu else rope_cache_write_reference
        fn(q, k, v, batch.positions, self.cos_sin, batch.slots, **caches)

    def _decode_attention(self, kv: PagedKVCache, li: int, q: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[B, Hq, D]: one new token per row over its cached context."""
        c = kv.layer_caches[li]
        splits = decode_splits(q.shape[0], kv.kv_heads, batch.max_len or self.max_model_len, self.sms)
        if kv.kind == "int4":
            if self.ops.gpu:
                from natix.kernels.kv4_decode_attention import kv4_decode_attention_triton

                return kv4_decode_attention_triton(q, c, batch.block_tables, batch.seq_lens, self.sm_scale,
                                                   num_splits=splits)
            from natix.kernels.kv4_decode_attention import kv4_decode_attention_reference

            return kv4_decode_attention_reference(q, c, batch.block_tables, batch.seq_lens, self.sm_scale)
        if self.ops.gpu:
            from natix.kernels.paged_attention import paged_decode_attention

            return paged_decode_attention(q, c[0], c[1], batch.block_tables, batch.seq_lens, self.sm_scale,
                                          num_splits=splits, check=False)
        from natix.kernels.paged_attention import paged_decode_attention_reference

        return paged_decode_attention_reference(q, c[0], c[1], batch.block_tables, batch.seq_lens, self.sm_scale)

    def _prefill_attention(self, kv: PagedKVCache, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           batch: Batch) -> torch.Tensor:
        """[T, Hq, D]: each sequence's new tokens attend causally to its cached context and to each other."""
        assert batch.new_lens is not None and batch.ctx_lens is not None and batch.pages is not None
        if self.prefill_quantized and kv.kind == "int4":
            from natix.quant.kv_quant import fake_quant_int4

            k, v = fake_quant_int4(k, kv.groups), fake_quant_int4(v, kv.groups)
        has_ctx = any(batch.ctx_lens)
        if has_ctx:
            k, v, cu_k, max_k = self._with_context(kv, li, k, v, batch)
        if self.ops.gpu:
            out = _flash_varlen(q, k, v, batch.cu_seqlens, cu_k if has_ctx else batch.cu_seqlens,
                                max(batch.new_lens), max_k if has_ctx else max(batch.new_lens), self.sm_scale)
            if out is not None:
                return out
        outs = []
        sq = sk = 0
        for n, ctx in zip(batch.new_lens, batch.ctx_lens):
            outs.append(_sdpa_causal(q[sq:sq + n], k[sk:sk + ctx + n], v[sk:sk + ctx + n], self.sm_scale))
            sq += n
            sk += ctx + n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _with_context(self, kv: PagedKVCache, li: int, k: torch.Tensor, v: torch.Tensor, batch: Batch
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Keys/values packed per sequence as [its cached context (dequantized), its new tokens]: one
        gather of every context page, one concatenation and one row selection per layer, through the
        batch's :meth:`Batch.context_plan` (built once per forward: no host-to-device copy per layer);
        and the cumulative key lengths."""
        pages, rows, cu_k, max_k = batch.context_plan(kv.page_size, k.device)
        kc, vc = kv.gather(li, pages)
        return torch.cat([kc, k])[rows], torch.cat([vc, v])[rows], cu_k, max_k


def decode_splits(batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Split-K factor of decode attention: split a row's context only until the grid covers about
    two programs per SM, each split at least 64 tokens. Measured on the H200 (reports/engine.md,
    decode_splits): at B=64 (512 row-heads) one split is fastest up to 1024 tokens (13 vs 23 µs at
    256 with 4 splits) and within 4% at 4096; at B=1 more splits win (4 at 256 tokens, 16 at 1024,
    32 at 4096), since 8 programs alone leave the card idle."""
    splits = 1
    while batch * kv_heads * splits < 2 * num_sms and max_len // (splits * 2) >= 64 and splits < 32:
        splits *= 2
    return splits


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D] (the last n of the m key positions), k/v [m, Hkv, D] -> [n, Hq, D]."""
    n, m = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if n == m:
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:  # bottom-right causal: query i sees keys [0, m - n + i]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


_FLASH_OK: Optional[bool] = None


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Any, cu_k: Any, max_q: int, max_k: int,
                  scale: float) -> Optional[torch.Tensor]:
    """All sequences in one FlashAttention-2 varlen launch (PyTorch's bundled kernel; GQA native; with
    more keys than queries the causal mask is aligned at the bottom right, the new tokens last).
    None where it is unavailable (then the caller runs SDPA per sequence)."""
    global _FLASH_OK
    if _FLASH_OK is False or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        out = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)[0]
    except (RuntimeError, TypeError) as e:
        import logging

        logging.getLogger("natix.engines.natix").warning("flash varlen attention unavailable (%s): SDPA per sequence", e)
        _FLASH_OK = False
        return None
    _FLASH_OK = True
    return out
