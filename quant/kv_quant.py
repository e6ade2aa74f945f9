"""KV-cache quantization for the reference (transformers) path: quantize at write, attend dequantized.

Two modes, chosen per model by ``model.natix_kv_cache`` (set by the loader from the scheme's
``kv_cache`` field; :func:`new_cache` reads it):

- ``"int4"`` (W4A8KV4): per token and KV head (or per group of ``model.natix_kv_group_size``
  channels of a head: w4a8kv4's ``kv_group_size``), asymmetric UINT4 with an fp16 scale and zero —
  exactly :func:`natix.kernels.kv4_cache.quantize_rows_reference`, so the reference path stores the
  same numbers the kernel cache does. Dynamic: nothing is calibrated. With w4a8kv4's ``kv_key_block``
  (``model.natix_kv_key_block`` = B > 0) the keys are quantized per channel instead, over blocks of B
  consecutive tokens of a sequence (KIVI's key layout): a block is quantized when it is complete, each
  channel of each head with its own UINT4 scale and zero over the block's B tokens
  (:func:`quantize_key_blocks`), and the tokens of the incomplete block stay 16-bit until it is. The values
  stay per token. Blocks count from the start of the cache, so a left-padded batch's first block of a
  short prompt holds pad tokens' keys too (their ranges widen it; the natix engine, which has no padding,
  does not serve this layout yet).
- ``"fp8"`` (the compressed-tensors schemes' fp8 KV option): e4m3 with one static scale per layer
  for keys and one for values, read from the attention module's ``k_scale`` / ``v_scale`` buffers
  (:func:`register_kv_scales`; state-dict names ``model.layers.N.self_attn.k_scale``, which vLLM's
  ``maybe_remap_kv_scale_name`` maps to its ``...self_attn.attn.k_scale``). Scales come from
  :func:`calibrate_fp8_kv_scales`: ``amax / 448`` over the calibration tokens.

Keys are quantized *after* RoPE (the cache holds rotated keys, as in the kernels and vLLM).

Where it hooks: a ``DynamicCache`` subclass whose cache-level ``update`` quantizes-dequantizes the
new states and then calls the ordinary per-layer update. The layers stay plain ``DynamicLayer``
objects, so ``natix.engines.kv_cache.preallocate`` still swaps them for its in-place slab layers
(it copies a layer's ``__dict__``), and the quantization survives the swap because it never lived
in the layers. The signature ``update(key_states, value_states, layer_idx, *args, **kwargs)`` is
what transformers 5.2 … 5.24 call (``cache_kwargs`` positional or ``kwargs=`` keyword).

Prefill (``natix_prefill``, :func:`new_cache`'s ``prefill``), the two semantics of the natix engine's
``prefill_attention`` option, so the reference reads what the engine reads:

- ``"unquantized"`` (generation's default, as QServe's kernels and the natix engine do): a prompt's
  tokens attend to each other's 16-bit keys/values; the cache stores them quantized, and every later
  (decode) token reads them quantized. Implemented as: an update into an empty layer stores the
  quantized states and returns the unquantized ones for that forward's attention.
- ``"quantized"``: every attention reads the stored (quantized) keys/values, prefill included — one
  code path for prefill and decode. Perplexity uses it (``natix-quant eval``): a full-window forward
  is a prefill, so with unquantized prefill attention the KV cache's quantization would never show
  in perplexity, while in generation every decoded token reads it.

Key rotation (``natix_key_rotation``, a w4a8kv4 artifact with ``rotate_keys``; the loader sets
``model.natix_kv_rotate_keys``): the engines rotate queries and keys after RoPE by the head Hadamard
``H`` (:func:`natix.quant.qoq.head_rotation`) and the cache stores ``Q(k H)``; ``(q H)·Q(k H)ᵀ`` is
what attention computes. The reference cache cannot reach the query, so it stores the same codes and
hands attention ``Q(k H) Hᵀ``, which gives the same scores with the unrotated query (``H Hᵀ = I``).

The values are stored dequantized in the model dtype: the reference measures accuracy, not memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

FP8_MAX = 448.0
KV_MODES = ("none", "int4", "fp8")
PREFILL_MODES = ("unquantized", "quantized")

__all__ = ["FP8_MAX", "KV_MODES", "PREFILL_MODES", "calibrate_fp8_kv_scales", "fake_quant_fp8", "fake_quant_int4",
           "fake_quant_int4_rotated",
           "kv_cache_scheme", "new_cache", "quantize_key_blocks", "quantized_cache_class", "register_kv_scales"]


# ---------------------------------------------------------------------------------------- math
def fake_quant_int4(x: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """``x [..., D]`` -> the same shape and dtype, each ``D``-row's ``num_groups`` channel groups
    replaced by their UINT4 dequantization ``code * scale + zero`` (fp16 scale/zero,
    :func:`natix.kernels.kv4_cache.quantize_rows_reference`)."""
    from natix.kernels.kv4_cache import dequantize_rows_reference, quantize_rows_reference

    return dequantize_rows_reference(*quantize_rows_reference(x, num_groups)).to(x.dtype)


def fake_quant_int4_rotated(x: torch.Tensor, h: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """``Q(x H) Hᵀ`` in ``x.dtype``: the KV4 codes of the rotated rows (rotated in float32 and rounded
    to ``x.dtype`` first, as the engine stores them), dequantized and rotated back. ``h [D, D]``."""
    hf = h.to(device=x.device, dtype=torch.float32)
    xr = (x.float() @ hf).to(x.dtype)
    return (fake_quant_int4(xr, num_groups).float() @ hf.t()).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x`` -> ``e4m3(x / scale) * scale`` in ``x.dtype`` (clamped to ±448: e4m3 has no inf)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


# ---------------------------------------------------------------------------------------- cache
def quantize_key_blocks(keys: torch.Tensor, start: int, block: int) -> int:
    """``keys [B, H, T, D]`` (a cache's stored keys, edited in place): every complete block of ``block``
    tokens from token ``start`` on (a multiple of ``block``) replaced by its per-channel UINT4
    dequantization — each head and channel one scale and zero over the block's tokens, as
    :func:`fake_quant_int4` computes them along the token axis. Returns the number of tokens now in
    complete (quantized) blocks."""
    full = keys.shape[-2] // block * block
    start = min(start, full)  # a cropped cache re-quantizes nothing it no longer holds
    for b0 in range(start, full, block):
        blk = keys[:, :, b0:b0 + block]
        keys[:, :, b0:b0 + block] = fake_quant_int4(blk.transpose(-1, -2), 1).transpose(-1, -2)
    return full


@functools.lru_cache(maxsize=None)
def quantized_cache_class() -> type:
    """The ``DynamicCache`` subclass (built on first use: transformers is imported lazily)."""
    from transformers import DynamicCache

    class QuantizedKVCache(DynamicCache):
        """A ``DynamicCache`` that stores fake-quantized keys/values (see module docstring).

        Set ``natix_kv_mode`` ("int4" | "fp8"), ``natix_prefill`` ("unquantized" | "quantized"),
        for fp8 ``natix_kv_scales`` ({layer_idx: (k_scale, v_scale)}), for int4 ``natix_kv_groups``
        (channel groups per head), with key rotation ``natix_key_rotation`` (``H [D, D]``) and for
        per-channel keys ``natix_key_block`` (tokens per block) after construction (:func:`new_cache` does)."""

        natix_kv_mode: str = "int4"
        natix_kv_groups: int = 1
        natix_prefill: str = "quantized"
        natix_kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        natix_key_rotation: torch.Tensor | None = None
        natix_key_block: int = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            raw = (key_states, value_states) if self.natix_prefill == "unquantized" \
                and self.get_seq_length(layer_idx) == 0 else None
            if self.natix_kv_mode == "int4" and self.natix_key_block:
                # keys stored 16-bit; the blocks this update completes are quantized in place
                keys, values = super().update(key_states, fake_quant_int4(value_states, self.natix_kv_groups),
                                              layer_idx, *args, **kwargs)
                if raw is not None and keys.data_ptr() == key_states.data_ptr():  # a layer that stores the update as is
                    raw = (key_states.clone(), raw[1])
                done = self.__dict__.setdefault("natix_key_blocks_done", {})
                done[layer_idx] = quantize_key_blocks(keys, done.get(layer_idx, 0), self.natix_key_block)
                return raw if raw is not None else (keys, values)
            if self.natix_kv_mode == "int4":
                rot = self.natix_key_rotation
                ng = self.natix_kv_groups
                key_states = fake_quant_int4(key_states, ng) if rot is None \
                    else fake_quant_int4_rotated(key_states, rot, ng)
                value_states = fake_quant_int4(value_states, ng)
            elif self.natix_kv_mode == "fp8":
                try:
                    ks, vs = self.natix_kv_scales[layer_idx]
                except KeyError:
                    raise RuntimeError(f"fp8 KV cache: no k_scale/v_scale for layer {layer_idx}") from None
                key_states, value_states = fake_quant_fp8(key_states, ks), fake_quant_fp8(value_states, vs)
            stored = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            # an empty layer holds exactly this update: its attention reads the 16-bit states
            return raw if raw is not None else stored

    return QuantizedKVCache


def _dynamic_cache(cls: type, model: Any) -> Any:
    try:
        return cls(config=model.config)
    except TypeError:  # older signature without config
        return cls()


def _fp8_scales(model: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "k_scale") and hasattr(mod, "v_scale") \
                and isinstance(mod.k_scale, torch.Tensor):
            scales[int(mod.layer_idx)] = (mod.k_scale.detach().float().reshape(()),
                                          mod.v_scale.detach().float().reshape(()))
    return scales


def new_cache(model: Any, prefill: str = "quantized") -> Any | None:
    """The cache for ``getattr(model, "natix_kv_cache", "none")``: None for "none" (use the
    engine's default), else a :func:`quantized_cache_class` instance whose prefill attention reads
    ``prefill`` keys/values (module docstring). fp8 reads every attention module's ``k_scale`` /
    ``v_scale``; ValueError if there are none or a mode is unknown. An int4 model with
    ``model.natix_kv_rotate_keys`` gets the key rotation (module docstring), and
    ``model.natix_kv_group_size`` channels per scale (-1 or absent: the whole head); keys per channel
    over blocks of ``model.natix_kv_key_block`` tokens when that is > 0."""
    mode = getattr(model, "natix_kv_cache", "none") or "none"
    if mode not in KV_MODES:
        raise ValueError(f"model.natix_kv_cache must be one of {', '.join(KV_MODES)}, got {mode!r}")
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
    if mode == "none":
        return None
    cache = _dynamic_cache(quantized_cache_class(), model)
    cache.natix_kv_mode, cache.natix_prefill = mode, prefill
    if mode == "int4":
        from natix.kernels.kv4_cache import kv_groups

        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        cache.natix_kv_groups = kv_groups(d, int(getattr(model, "natix_kv_group_size", -1)))
        cache.natix_key_block = int(getattr(model, "natix_kv_key_block", 0))
        if getattr(model, "natix_kv_rotate_keys", False):
            from natix.quant.qoq import head_rotation

            cache.natix_key_rotation = head_rotation(d).float()
    if mode == "fp8":
        scales = _fp8_scales(model)
        n_layers = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None) \
            if hasattr(model.config, "get_text_config") else getattr(model.config, "num_hidden_layers", None)
        if not scales or (n_layers is not None and len(scales) != n_layers):
            raise ValueError(f"fp8 KV cache needs k_scale/v_scale on every attention module; found them on "
                             f"{len(scales)} of {n_layers} layers (export with the fp8 KV option)")
        cache.natix_kv_scales = scales
    return cache


# ---------------------------------------------------------------------------------------- fp8 scales
def register_kv_scales(attn: torch.nn.Module, k_scale: float | torch.Tensor, v_scale: float | torch.Tensor) -> None:
    """Store the static fp8 KV scales on an attention module as fp32 ``[1]`` buffers ``k_scale``,
    ``v_scale`` (persistent: they are in the state dict under ``...self_attn.k_scale``)."""
    dev = next((p.device for p in attn.parameters()), torch.device("cpu"))
    for name, val in (("k_scale", k_scale), ("v_scale", v_scale)):
        t = torch.as_tensor(val, dtype=torch.float32).detach().reshape(1).to(dev).clone()
        if name in attn._buffers:
            attn._buffers[name] = t
        else:
            attn.register_buffer(name, t)


def _find_attention(block: torch.nn.Module) -> torch.nn.Module:
    for mod in block.modules():
        if hasattr(mod, "k_proj") and hasattr(mod, "v_proj"):
            return mod
    raise ValueError(f"no attention module with k_proj/v_proj in {type(block).__name__}")


def _head_dim(attn: torch.nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    if hd is None:
        cfg = attn.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def calibrate_fp8_kv_scales(prefix: str, block: torch.nn.Module, run_block: Any) -> tuple[float, float]:
    """Run ``run_block()`` (every calibration input through ``block``) and return the static fp8
    ``(k_scale, v_scale)`` = ``(amax|k| / 448, amax|v| / 448)`` over the calibration tokens.

    Keys are cached after RoPE, which hooks cannot see from outside the attention forward. RoPE
    rotates each pair ``(k_i, k_{i + D/2})`` (transformers' ``rotate_half`` convention), which keeps
    the pair's norm, so ``max sqrt(k_i^2 + k_{i+D/2}^2)`` over the pre-RoPE keys (after ``k_norm``
    where the model has one) bounds every post-RoPE |k| — a safe scale, at most √2 too large.
    Values are not rotated: their amax is exact."""
    attn = _find_attention(block)
    d = _head_dim(attn)
    amax = {"k": torch.zeros(()), "v": torch.zeros(())}

    def pair_norm_max(out: torch.Tensor) -> torch.Tensor:
        x = out.detach().float().reshape(*out.shape[:-1], -1, d)
        return torch.sqrt(x[..., : d // 2] ** 2 + x[..., d // 2:] ** 2).amax().cpu()

    def on_k(_m: Any, _i: Any, out: torch.Tensor) -> None:
        amax["k"] = torch.maximum(amax["k"], pair_norm_max(out))

    def on_v(_m: Any, _i: Any, out: torch.Tensor) -> None:
        amax["v"] = torch.maximum(amax["v"], out.detach().float().abs().amax().cpu())

    k_src = attn.k_norm if isinstance(getattr(attn, "k_norm", None), torch.nn.Module) else attn.k_proj
    handles = [k_src.register_forward_hook(on_k), attn.v_proj.register_forward_hook(on_v)]
    try:
        run_block()
    finally:
        for h in handles:
            h.remove()
    if not (amax["k"] > 0 and amax["v"] > 0):
        raise ValueError(f"{prefix}: calibration produced no keys/values (amax k={float(amax['k'])}, "
                         f"v={float(amax['v'])}); is the calibration set empty?")
    # a floor keeps a degenerate (all-tiny) layer from dividing by ~0 at serve time
    return max(float(amax["k"]) / FP8_MAX, 1e-12), max(float(amax["v"]) / FP8_MAX, 1e-12)


def kv_cache_scheme() -> dict[str, Any]:
    """The compressed-tensors ``kv_cache_scheme`` of a static per-tensor fp8 KV cache (what vLLM
    reads to allocate an fp8 cache and load ``k_scale`` / ``v_scale``), validated by the library."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    return args.model_dump(mode="json")


# ------------------------------------------------------------------------- scheme-side glue
def calibrate_block_kv_scales(prefix: str, block: torch.nn.Module, run_block: Any, report: dict[str, Any]) -> None:
    """``prepare_block`` of a scheme with the fp8 KV option: calibrate and attach the block's
    static scales (recorded under ``report["kv_scales"][prefix]``)."""
    k, v = calibrate_fp8_kv_scales(prefix, block, run_block)
    register_kv_scales(_find_attention(block), k, v)
    report.setdefault("kv_scales", {})[prefix] = {"k_scale": k, "v_scale": v}


def register_placeholder_scales(model: torch.nn.Module) -> None:
    """Loader side: give every attention module ``k_scale`` / ``v_scale`` buffers for the
    checkpoint's values to load into."""
    for mod in model.modules():
        if hasattr(mod, "k_proj") and hasattr(mod, "v_proj") and hasattr(mod, "layer_idx"):
            register_kv_scales(mod, 1.0, 1.0)
