"""``W4A8KV4Config``: QServe QoQ — UINT4 weights, INT8 per-token activations, UINT4 KV cache.

Weights: GPTQ (or round to nearest) on the W4A8 grid of :mod:`natix.kernels.packing` — progressive
(INT8 per channel in [-119, 119], then UINT4 per group of 128, 64 or 32 input channels with integer
scale/zero) or one UINT4 level per channel. Layers whose ``in_features`` the group size does not
divide (SmolLM2-135M's hidden size is 576 = 4.5 x 128, so q/k/v/o/gate/up at g128) get the
``group_fallback``: ``"finer"`` (the default: the largest of 64 and 32 that divides, 576 -> g64; per
channel if none does), ``"channel"`` or ``"error"``. The group size each layer actually got is its
``layer_meta()`` and lands in the manifest.

Before quantizing: the function-preserving QoQ transforms of :mod:`natix.quant.qoq` (fold norms,
optional residual rotation, SmoothAttention on q/k, SmoothQuant-style smoothing of the o_proj and
down_proj inputs). The KV cache (``kv_cache="int4"``) is quantized at serve time, per token and
head, dynamic: nothing about it is stored but the choice, which the loader hands to engines as
``model.natix_kv_cache``.

The artifact format is our own (natix's engines read it, and vLLM through natix's plugin
:mod:`natix.engines.vllm_plugin`): ``docs/w4a8kv4-format.md``. This module
stays torch-free at import time (the registry imports it to list schemes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from natix.quant.errors import QuantError
from natix.quant.schemes import QuantConfig, finer_group_size, register_scheme

# the layer_meta "format" of natix.quant.w8a16's modules (kept here: this module is torch-free)
EMBEDDING_FORMAT = "int8_embedding"
LINEAR_FORMAT = "w8a16"

QUANT_METHOD = "natix-w4a8kv4"
GROUP_SIZE = 128  # QServe's group size, the default (natix.kernels.packing.GROUP_SIZE)
GROUP_SIZES = (32, 64, 128)  # what the kernels take (natix.kernels.packing.GROUP_SIZES; this module is torch-free)
GROUP_FALLBACKS = ("finer", "channel", "error")
WEIGHT_SCALES = ("minmax", "mse")  # level-1 range of each group: min-max, or a clipping search
# one KV4 scale per head by default: 32-channel groups halve KV4's perplexity cost on the embedded
# model, but the grouped decode kernel is 2-5x slower today (reports/quant-accuracy-notes.md, "KV4 channel groups")
KV_GROUP_SIZE = -1
VOCAB_BITS = (16, 8)  # embed_bits / lm_head_bits: the model dtype, or int8 rows (natix.quant.w8a16)


@register_scheme("w4a8kv4")
@dataclass(frozen=True)
class W4A8KV4Config(QuantConfig):
    """QoQ W4A8KV4 config (see module docstring).

    ``group_size``: 128, 64 or 32 (progressive) or -1 (per channel); ``group_fallback``: what a
    layer whose K the group size does not divide gets — "finer" (the largest smaller group size
    that divides K, else per channel), "channel" (per channel) or "error"; ``kv_cache``:
    "int4" or "none" (KV16, the ablation); ``kv_group_size``: channels per KV4 scale and zero, -1 (the
    whole head, QServe's format; the default) or a power of two >= 16 (a head whose half it does not
    divide takes the next smaller one, down to 16, else one group: :func:`natix.kernels.kv4_cache.kv_groups`):
    finer groups keep an outlier channel's range to its own group; ``kv_key_block``: 0 (the default) quantizes
    keys like values, per token; a power of two from 16 to 1024 quantizes them per channel over blocks of that
    many tokens instead (KIVI's key layout: one scale and zero per block, head and channel, set when the block
    is complete; the tokens of the incomplete block stay 16-bit), values per token as before — served by the
    reference path (``hf`` engine) only for now; ``gptq``: GPTQ with calibration Hessians, else round to
    nearest; ``smooth_attention`` / ``smooth_outputs`` / ``smooth_alpha`` / ``rotate`` / ``seed``:
    the QoQ transforms; ``rotate_values``: values rotated by a Hadamard inside each head, folded
    into v_proj / o_proj (offline, no runtime cost); ``rotate_keys``: queries and keys rotated by the
    same Hadamard after RoPE at run time (q·kᵀ unchanged; the KV4 cache stores rotated keys; both
    engines read it from the manifest's ``transforms``); ``weight_scale``: each progressive
    group's level-1 range, "minmax" or "mse" (the clipping ratio from 1.00 down to 0.70 with the
    least squared error on the group's INT8 values; same format, nothing changes at run time);
    ``act_order``: GPTQ processes a progressive layer's columns in order of decreasing Hessian
    diagonal, its groups fitted up front on the original weight (static groups: the format keeps
    contiguous groups and no g_idx); per-channel layers always do;
    ``percdamp``: GPTQ dampening; ``ignore``: Linear names kept in float
    (by the 4-bit path: lm_head is ``lm_head_bits``'s). ``embed_bits`` / ``lm_head_bits``: 16 (the
    model dtype) or 8 — the embedding table as int8 per token row and lm_head as a W8A16 linear (int8
    per output channel, activations unquantized), each with float32 row scales
    (:mod:`natix.quant.w8a16`); 16 by default (measured: reports/quant-accuracy.md, "8-bit embeddings
    and lm_head"); an artifact written before the options existed has both 16.
    """

    version: int = 1
    group_size: int = GROUP_SIZE
    group_fallback: str = "finer"
    kv_cache: str = "int4"
    kv_group_size: int = KV_GROUP_SIZE
    kv_key_block: int = 0  # opt-in: reports/quant-accuracy-notes.md, "Per-channel keys"
    gptq: bool = True
    smooth_attention: bool = True
    smooth_alpha: float = 0.5
    rotate: bool = True
    smooth_outputs: bool = True
    rotate_values: bool = True  # free at run time (folded into v_proj / o_proj); docs/w4a8kv4-format.md
    rotate_keys: bool = False  # opt-in: a per-layer rotation in the decode step (4-6% of tok/s on the H200)
    percdamp: float = 0.01
    seed: int = 0
    ignore: tuple[str, ...] = ("lm_head",)
    weight_scale: str = "minmax"
    act_order: bool = True  # measured: reports/quant-accuracy-notes.md, "Group sizes and act-order"
    embed_bits: int = 16  # 8: int8 rows (opt-in: the vLLM plugin serves 16-bit tables; reports/quant-accuracy.md)
    lm_head_bits: int = 16

    def __post_init__(self) -> None:
        if self.group_size not in (*GROUP_SIZES, -1) or isinstance(self.group_size, bool):
            raise QuantError(f"w4a8kv4: group_size must be one of {', '.join(map(str, GROUP_SIZES))} (progressive) "
                             f"or -1 (per channel), got {self.group_size!r}")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise QuantError(f"w4a8kv4: group_fallback must be one of {', '.join(GROUP_FALLBACKS)}, "
                             f"got {self.group_fallback!r}")
        if self.weight_scale not in WEIGHT_SCALES:
            raise QuantError(f"w4a8kv4: weight_scale must be one of {', '.join(WEIGHT_SCALES)}, got {self.weight_scale!r}")
        if self.kv_cache not in ("int4", "none"):
            raise QuantError(f"w4a8kv4: kv_cache must be 'int4' or 'none' (KV16), got {self.kv_cache!r}")
        g = self.kv_group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or (g >= 16 and not g & (g - 1))):
            raise QuantError(f"w4a8kv4: kv_group_size must be -1 (the whole head) or a power of two >= 16, got {g!r}")
        b = self.kv_key_block
        if isinstance(b, bool) or not isinstance(b, int) or not (b == 0 or (16 <= b <= 1024 and not b & (b - 1))):
            raise QuantError(f"w4a8kv4: kv_key_block must be 0 (keys per token) or a power of two from 16 to 1024 "
                             f"(keys per channel over blocks of that many tokens), got {b!r}")
        if b and self.kv_cache != "int4":
            raise QuantError("w4a8kv4: kv_key_block sets the KV4 keys' layout, but kv_cache is 'none' (16-bit)")
        if b and self.rotate_keys is True:
            raise QuantError("w4a8kv4: kv_key_block (keys per channel) and rotate_keys (keys rotated within the head) "
                             "do not combine: the rotation spreads the outlier channels that per-channel scales keep "
                             "apart; set one of them")
        for flag in ("gptq", "smooth_attention", "rotate", "smooth_outputs", "rotate_values", "rotate_keys",
                     "act_order"):
            if not isinstance(getattr(self, flag), bool):
                raise QuantError(f"w4a8kv4: {flag} must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                or not 0.0 <= self.smooth_alpha <= 1.0:
            raise QuantError(f"w4a8kv4: smooth_alpha must be in [0, 1], got {self.smooth_alpha!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or self.percdamp < 0:
            raise QuantError(f"w4a8kv4: percdamp must be >= 0, got {self.percdamp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise QuantError(f"w4a8kv4: seed must be an integer, got {self.seed!r}")
        # accept a list from JSON/YAML; keep the frozen value hashable
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for name in ("embed_bits", "lm_head_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v not in VOCAB_BITS:
                raise QuantError(f"w4a8kv4: {name} must be one of {', '.join(map(str, VOCAB_BITS))} "
                                 f"(16: the model dtype; 8: int8 rows with float32 scales), got {v!r}")
        if self.lm_head_bits != 16 and not self.skips("lm_head"):
            raise QuantError("w4a8kv4: lm_head_bits=8 makes lm_head an int8 W8A16 linear, but 'lm_head' is not in "
                             "ignore, which asks for W4A8 there; keep 'lm_head' in ignore, or set lm_head_bits=16")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "W4A8KV4Config":
        """As :meth:`QuantConfig.from_dict`; a config that spells out the QoQ transforms (``rotate``:
        every manifest does) without ``rotate_values`` / ``rotate_keys`` / ``embed_bits`` /
        ``lm_head_bits`` was written before those options existed and had none of them (16-bit
        embedding and lm_head), whatever the defaults are now; likewise ``group_fallback`` ("channel"
        then; each layer's group size is in its own record either way), ``weight_scale`` ("minmax"),
        ``act_order`` (false), ``kv_group_size`` (-1: one KV4 scale per head) and ``kv_key_block`` (0: keys
        per token). A partial config
        (no ``rotate``) takes the defaults."""
        if "rotate" in d:
            d = {"rotate_values": False, "rotate_keys": False, "embed_bits": 16, "lm_head_bits": 16,
                 "group_fallback": "channel", "weight_scale": "minmax", "act_order": False, "kv_group_size": -1,
                 "kv_key_block": 0, **d}
        return super().from_dict(d)  # type: ignore[return-value]

    def bits_per_weight(self) -> float:
        return 4.0

    # ------------------------------------------------------------------------------ weights
    def layer_group_size(self, in_features: int, out_features: int, name: str = "") -> int:
        """The group size a Linear(in_features, out_features) called ``name`` gets (128, 64, 32 or
        -1), or QuantError when the format cannot hold it."""
        layer = f"layer {name!r}" if name else "a layer"
        if out_features % 2:
            raise QuantError(f"w4a8kv4: {layer} has out_features={out_features}; the W4A8 format needs an even "
                             f"N — add it to ignore to keep it in float")
        g = self.group_size
        if g > 0 and in_features % g:
            if self.group_fallback == "error":
                raise QuantError(
                    f"w4a8kv4: {layer} has in_features={in_features}, not a multiple of {g}; set "
                    f"group_fallback='finer' (a smaller group size that divides it) or 'channel' (per channel "
                    f"for such layers), or group_size=-1, or ignore it")
            if self.group_fallback == "finer":
                return finer_group_size(in_features, g, GROUP_SIZES)
            return -1
        return g

    def quantize_linear(self, linear: Any, *, name: str = "", hessian: Any = None) -> Any:
        from natix.quant.gptq import AffineGrid, GptqError, ProgressiveGrid, gptq_quantize
        from natix.quant.w4a8 import W4A8Linear

        gs = self.layer_group_size(linear.in_features, linear.out_features, name)
        clip = self.weight_scale == "mse" and gs > 0
        if (hessian is None or not self.gptq) and not clip:
            return W4A8Linear.from_linear(linear, group_size=gs)
        grid = ProgressiveGrid(clip_search=clip) if gs > 0 else AffineGrid(bits=4)
        if hessian is None or not self.gptq:  # round to nearest on the searched ranges (GPTQ with H = I)
            import torch

            hessian, percdamp = torch.eye(linear.in_features), 0.0
        else:
            percdamp = self.percdamp
        try:
            # progressive groups must stay contiguous (the format has no g_idx): act-order there is
            # GPTQ's static groups (every group fitted on the original weight, then the columns solved
            # in activation order); per channel there is one group, and the column order is free
            act = gs == -1 or (self.act_order and hessian is not None and self.gptq)
            result = gptq_quantize(linear.weight.detach(), hessian, grid, percdamp=percdamp, group_size=gs,
                                   act_order=act, static_groups=gs > 0)
        except GptqError as e:
            raise QuantError(f"w4a8kv4: GPTQ failed on layer {name!r}: {e}") from e
        return W4A8Linear.from_gptq(result, grid, bias=linear.bias)

    def empty_linear(self, in_features: int, out_features: int, bias: bool, dtype: Any,
                     meta: dict[str, Any] | None = None) -> Any:
        from natix.quant.w4a8 import W4A8Linear

        if (meta or {}).get("format") == LINEAR_FORMAT:
            from natix.quant.w8a16 import W8A16Linear

            return W8A16Linear(in_features, out_features, bias=bias, dtype=dtype)
        gs = (meta or {}).get("group_size")
        if gs is None:
            gs = self.layer_group_size(in_features, out_features)
        return W4A8Linear(in_features, out_features, bias=bias, group_size=int(gs), dtype=dtype)

    def tensor_layout(self, out_features: int, in_features: int, meta: dict[str, Any]
                      ) -> dict[str, tuple[str, tuple[int, ...]]]:
        n, k = out_features, in_features
        if meta.get("format") in (EMBEDDING_FORMAT, LINEAR_FORMAT):  # embed_bits / lm_head_bits = 8
            return {"qweight": ("I8", (n, k)), "scale": ("F32", (n,))}
        out = {"qweight": ("U8", (n // 2, k)), "scale": ("F32", (n,))}  # rows j and j + N/2 share a byte
        g = int(meta["group_size"])
        if g > 0:
            out["group_scale"] = ("U8", (k // g, n))
            out["group_zero"] = ("U8", (k // g, n))
        else:
            out["zero"] = ("U8", (n,))
        return out

    def empty_module(self, name: str, old: Any, dtype: Any, meta: dict[str, Any] | None = None) -> Any:
        if (meta or {}).get("format") == EMBEDDING_FORMAT:
            from natix.quant.w8a16 import Int8Embedding

            return Int8Embedding(old.num_embeddings, old.embedding_dim, dtype=dtype)
        return super().empty_module(name, old, dtype, meta)

    # ------------------------------------------------------------------------------ vocabulary tensors
    def quantize_vocab(self, model: Any, report: dict[str, Any]) -> list[str]:
        """``embed_bits`` / ``lm_head_bits`` = 8: replace the embedding table by an
        :class:`~natix.quant.w8a16.Int8Embedding` and lm_head by a
        :class:`~natix.quant.w8a16.W8A16Linear` (round to nearest, per row). Runs after
        :meth:`prepare_model` (so on the rotated, norm-folded tensors) and before calibration (so
        every layer is calibrated on the embeddings it will be served). Returns the replaced names."""
        if self.embed_bits == 16 and self.lm_head_bits == 16:
            return []
        import torch
        from torch import nn

        from natix.quant.w8a16 import Int8Embedding, W8A16Linear

        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        _untie(model)  # each of the two gets its own codes; a tied bf16 one must not change with the other
        done = []
        with torch.no_grad():
            if self.embed_bits == 8:
                if type(emb) is not nn.Embedding:
                    raise QuantError(f"w4a8kv4: embed_bits=8 needs an nn.Embedding input embedding, got "
                                     f"{type(emb).__name__}")
                q = Int8Embedding.from_embedding(emb)
                model.set_submodule(names[id(emb)], q)
                done.append(names[id(emb)])
            if self.lm_head_bits == 8:
                if type(head) is not nn.Linear:
                    raise QuantError(f"w4a8kv4: lm_head_bits=8 needs an nn.Linear output embedding, got "
                                     f"{type(head).__name__}")
                model.set_submodule(names[id(head)], W8A16Linear.from_linear(head))
                done.append(names[id(head)])
        report["vocab_int8"] = {"embed_bits": self.embed_bits, "lm_head_bits": self.lm_head_bits, "modules": done,
                                "format": "int8 rows, symmetric absmax, float32 scale per row"}
        return done

    # ------------------------------------------------------------------------------ QoQ transforms
    def needs_calibration(self) -> bool:
        return self.gptq or self.smooth_attention or self.smooth_outputs or self.rotate_values

    def needs_hessians(self) -> bool:
        return self.gptq

    def prepare_model(self, model: Any, report: dict[str, Any]) -> None:
        if not (self.rotate or self.smooth_attention or self.smooth_outputs):
            return
        from natix.quant import qoq

        report["qoq_prepare"] = qoq.prepare_model(model, rotate=self.rotate, seed=self.seed)

    def prepare_block(self, prefix: str, block: Any, run_block: Any, report: dict[str, Any]) -> None:
        if not (self.smooth_attention or self.smooth_outputs or self.rotate_values):
            return
        from natix.quant import qoq

        if self.smooth_attention or self.smooth_outputs:
            out = qoq.smooth_block(prefix, block, run_block, alpha=self.smooth_alpha,
                                   smooth_attention=self.smooth_attention, smooth_outputs=self.smooth_outputs)
            report.setdefault("qoq_smooth", {})[prefix] = out
        if self.rotate_values:
            # after the smoothing, so the KV4 quantizer sees the final (smoothed, rotated) values
            report.setdefault("qoq_value_rotation", {})[prefix] = qoq.rotate_value_heads(prefix, block.self_attn)

    def prepare_empty_model(self, model: Any) -> None:
        # prepare_model unties lm_head from the embeddings (rotation makes them differ), and so does
        # quantize_vocab; a model rebuilt from a config that still says "tied" must be untied before
        # loading two tensors
        if not (self.rotate or self.smooth_attention or self.smooth_outputs
                or self.embed_bits != 16 or self.lm_head_bits != 16):
            return
        _untie(model)

    # ------------------------------------------------------------------------------ artifact
    def hf_quantization_config(self, layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "format": "natix.kernels.packing W4A8 (see docs/w4a8kv4-format.md)",
            "group_size": self.group_size,
            "group_fallback": self.group_fallback,
            "weights": {"num_bits": 4, "type": "uint", "symmetric": False,
                        "progressive_level0": {"num_bits": 8, "strategy": "channel", "clamp": 119},
                        "tensors": ["qweight", "scale", "group_scale", "group_zero", "zero"]},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                  "dynamic": True},
            "kv_cache": self.kv_cache,
            "kv_group_size": self.kv_group_size,
            "kv_key_block": self.kv_key_block,
            "kv_cache_scheme": ({"num_bits": 4, "type": "uint",
                                 "strategy": "token-head" if self.kv_group_size == -1 else "token-head-group",
                                 "group_size": self.kv_group_size, "symmetric": False,
                                 "dynamic": True, "scale_dtype": "float16", "post_rope": True,
                                 **({"key_strategy": "channel-block", "key_block_tokens": self.kv_key_block}
                                    if self.kv_key_block else {})}
                                if self.kv_cache == "int4" else None),
            "transforms": {"rotate": self.rotate, "smooth_attention": self.smooth_attention,
                           "smooth_outputs": self.smooth_outputs, "smooth_alpha": self.smooth_alpha,
                           "seed": self.seed, "rotate_values": self.rotate_values,
                           "rotate_keys": self.rotate_keys},
            "gptq": self.gptq,
            "weight_scale": self.weight_scale,
            "act_order": self.act_order,
            "ignore": list(self.ignore),
            # 8: int8 rows + float32 row scales (tensors qweight, scale; natix.quant.w8a16); the
            # layers of that format are the records below whose "format" says so
            "embed_bits": self.embed_bits,
            "lm_head_bits": self.lm_head_bits,
            "layers": dict(sorted((layers or {}).items())),
        }

    def engines(self) -> dict[str, str]:
        vocab = self.embed_bits != 16 or self.lm_head_bits != 16
        return {
            "natix hf": "reference W4A8Linear + KV4 cache via natix.quant.loader.load_artifact (CPU/GPU, slow)",
            "natix kernels": "Triton w4a8_gemm / kv4 cache (natix.kernels; CUDA sm80+)",
            "vllm": ("not this artifact: natix's vLLM plugin serves 16-bit embeddings and lm_head only (re-export "
                     "with --set embed_bits=16 --set lm_head_bits=16)" if vocab else
                     "natix's vLLM plugin (natix.engines.vllm_plugin, found through its entry point; tensor "
                     "parallel; KV cache in vLLM's dtype, not KV4)"),
        }


def _untie(model: Any) -> None:
    """Give a tied lm_head its own copy of the embedding table; the config then says untied."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", False):
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        text = getattr(model.config, "get_text_config", None)
        if text is not None:
            text(decoder=True).tie_word_embeddings = False
