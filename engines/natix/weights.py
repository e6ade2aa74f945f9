"""The tensors the natix engine runs, taken from a loaded model or drawn at random.

Three schemes, one layout: every decoder layer has a fused QKV linear, an output projection, a
fused gate/up linear and a down projection, plus its two RMSNorm weights. A linear is dense (the
model dtype), FP8 (e4m3 per channel, `natix.kernels.fp8_linear`) or W4A8 (the packed format of
`natix.kernels.packing`). Fusing concatenates output rows (W4A8: through `concat_packed`).

The embedding table and lm_head are the model dtype, or int8 rows with float32 row scales
(:class:`Int8Rows`: a w4a8kv4 artifact's ``embed_bits`` / ``lm_head_bits`` = 8, the format of
`natix.kernels.w8a16_linear`), which :class:`~natix.engines.natix.model.DecoderModel` keeps 8-bit on
CUDA (gather x scale; the W8A16 GEMM) and dequantizes once on CPU.

Sources: :func:`from_hf_model` reads the modules of a model loaded by natix's loaders (a base
model, base + merged adapter, or a quantized artifact whose quantized linears are the scheme's
reference modules), so every check those loaders make applies; :func:`random_weights` draws a
model of a given shape (round-to-nearest quantization of random weights) for speed measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from natix.engines.natix.spec import EngineLoadError, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

SCHEMES = ("dense", "fp8", "w4a8kv4")
VOCAB_BITS = (16, 8)


@dataclass
class Int8Rows:
    """An embedding table or lm_head weight [V, D] stored as int8 rows (``qweight``, symmetric) with a
    float32 ``scale`` [V] per row; it reads as a ``dtype`` [V, D] tensor (``W[v] = scale[v] * qweight[v]``),
    so ``.dtype`` / ``.device`` / ``.shape`` answer as the dense tensor it stands for would."""

    qweight: "torch.Tensor"
    scale: "torch.Tensor"
    dtype: "torch.dtype"

    @property
    def device(self) -> "torch.device":
        return self.qweight.device

    @property
    def shape(self) -> "torch.Size":
        return self.qweight.shape

    def to(self, device: Any, dtype: "torch.dtype") -> "Int8Rows":
        return Int8Rows(self.qweight.to(device).contiguous(), self.scale.to(device).float().contiguous(), dtype)

    def dequantized(self, dtype: Optional["torch.dtype"] = None) -> "torch.Tensor":
        from natix.kernels.w8a16_linear import dequantize_int8_rows

        return dequantize_int8_rows(self.qweight, self.scale, dtype or self.dtype)

    @classmethod
    def quantize(cls, w: "torch.Tensor") -> "Int8Rows":
        from natix.kernels.w8a16_linear import quantize_int8_rows

        q, s = quantize_int8_rows(w)
        return cls(q, s, w.dtype)


@dataclass
class LinearWeights:
    """One (possibly fused) linear: ``kind`` dense | fp8 | w4a8; ``weight`` a tensor [N, K], an
    ``Fp8Weight`` or a ``W4A8Weight``; ``bias`` [N] or None."""

    kind: str
    n: int
    k: int
    weight: Any
    bias: Optional["torch.Tensor"] = None

    def to(self, device: Any, dtype: "torch.dtype") -> "LinearWeights":
        w = self.weight
        if self.kind == "dense":
            w = w.to(device=device, dtype=dtype).contiguous()
        elif self.kind == "fp8":
            from natix.kernels.fp8_linear import Fp8Weight

            w = Fp8Weight(w.weight.to(device).contiguous(), w.weight_scale.to(device).float().contiguous())
        else:
            w = w.to(device)
        b = None if self.bias is None else self.bias.to(device=device, dtype=dtype).contiguous()
        return LinearWeights(self.kind, self.n, self.k, w, b)


@dataclass
class LayerWeights:
    input_norm: "torch.Tensor"
    post_norm: "torch.Tensor"
    qkv: LinearWeights
    o: LinearWeights
    gate_up: LinearWeights
    down: LinearWeights


@dataclass
class ModelWeights:
    """A whole decoder. ``scheme``: dense | fp8 | w4a8kv4; ``embed`` / ``lm_head``: [V, D] in the model
    dtype or :class:`Int8Rows` (the same object when tied); ``kv_cache``: the KV cache the source
    asks for ("int4" for a w4a8kv4 artifact, else "none"); ``rope``: (inv_freq, scaling);
    ``rotate_keys``: the artifact's queries and keys are rotated by the head Hadamard after RoPE
    (w4a8kv4 ``rotate_keys``; :class:`natix.engines.natix.model.DecoderModel` applies it);
    ``kv_group_size``: channels per KV4 scale and zero (w4a8kv4 ``kv_group_size``; -1: the head)."""

    spec: ModelSpec
    scheme: str
    embed: "torch.Tensor | Int8Rows"
    layers: list[LayerWeights]
    norm: "torch.Tensor"
    lm_head: "torch.Tensor | Int8Rows"
    rope: tuple["torch.Tensor", float]
    kv_cache: str = "none"
    info: dict[str, Any] = field(default_factory=dict)
    rotate_keys: bool = False
    kv_group_size: int = -1

    def to(self, device: Any, dtype: "torch.dtype") -> "ModelWeights":
        def t(x: Any) -> Any:
            if isinstance(x, Int8Rows):
                return x.to(device, dtype)
            return x.to(device=device, dtype=dtype).contiguous()

        tied = self.lm_head is self.embed
        layers = [LayerWeights(t(L.input_norm), t(L.post_norm), L.qkv.to(device, dtype), L.o.to(device, dtype),
                               L.gate_up.to(device, dtype), L.down.to(device, dtype)) for L in self.layers]
        embed = t(self.embed)
        return ModelWeights(self.spec, self.scheme, embed, layers, t(self.norm), embed if tied else t(self.lm_head),
                            (self.rope[0].to(device), self.rope[1]), self.kv_cache, dict(self.info), self.rotate_keys,
                            self.kv_group_size)

    def nbytes(self) -> int:
        """Bytes of every tensor (a tied lm_head once)."""
        import torch

        seen: set[int] = set()

        def size(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                if x.data_ptr() in seen:
                    return 0
                seen.add(x.data_ptr())
                return x.numel() * x.element_size()
            if hasattr(x, "__dataclass_fields__"):
                return sum(size(getattr(x, f)) for f in x.__dataclass_fields__)
            return 0

        total = size(self.embed) + size(self.norm) + size(self.lm_head)
        for L in self.layers:
            total += size(L.input_norm) + size(L.post_norm)
            for lw in (L.qkv, L.o, L.gate_up, L.down):
                total += size(lw.weight) + size(lw.bias)
        return total


# ------------------------------------------------------------------------------------ from a model
def _linear_kind(mod: Any) -> str:
    from torch import nn

    from natix.quant.fp8 import Fp8Linear
    from natix.quant.w4a8 import W4A8Linear

    if isinstance(mod, W4A8Linear):
        return "w4a8"
    if isinstance(mod, Fp8Linear):
        return "fp8"
    if type(mod) is nn.Linear:
        return "dense"
    raise EngineLoadError(f"the natix engine runs dense, fp8 and w4a8kv4 linears; {type(mod).__name__} is none "
                          f"of them (gptq W4A16 artifacts are served by vLLM)")


def fuse(mods: list[Any], name: str) -> LinearWeights:
    """Concatenate the output rows of ``mods`` (all of one kind and K) into one linear."""
    import torch

    kinds = {_linear_kind(m) for m in mods}
    if len(kinds) != 1:
        raise EngineLoadError(f"{name}: the natix engine fuses these linears into one GEMM, but they mix "
                              f"{', '.join(sorted(kinds))}")
    kind = kinds.pop()
    k = mods[0].in_features
    n = sum(m.out_features for m in mods)
    biases = [m.bias for m in mods]
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=mods[0].weight.dtype
                                                                           if kind == "dense" else torch.float32)
                          for b, m in zip(biases, mods)])
    else:
        bias = None
    if kind == "dense":
        weight: Any = torch.cat([m.weight.detach() for m in mods])
    elif kind == "fp8":
        from natix.kernels.fp8_linear import Fp8Weight

        weight = Fp8Weight(torch.cat([m.weight.detach() for m in mods]).contiguous(),
                           torch.cat([m.weight_scale.detach().reshape(-1).float() for m in mods]).contiguous())
    else:
        from natix.kernels.packing import concat_packed

        try:
            weight = concat_packed([m.packed() for m in mods])
        except ValueError as e:
            raise EngineLoadError(f"{name}: {e}") from e
    return LinearWeights(kind, n, k, weight, bias)


def from_hf_model(model: Any, scheme: str, kv_cache: str = "none") -> ModelWeights:
    """Read a transformers Llama-family model (dense, or with natix's quantized reference modules);
    a w4a8kv4 artifact's key rotation and KV4 group size come from ``model.natix_kv_rotate_keys`` and
    ``model.natix_kv_group_size`` (set by the loader)."""
    spec = ModelSpec.from_hf_config(model.config)
    inner = model.model
    layers = []
    for i, layer in enumerate(inner.layers):
        a, m = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
            qkv=fuse([a.q_proj, a.k_proj, a.v_proj], f"layer {i} q/k/v"), o=fuse([a.o_proj], f"layer {i} o_proj"),
            gate_up=fuse([m.gate_proj, m.up_proj], f"layer {i} gate/up"), down=fuse([m.down_proj], f"layer {i} down_proj"),
        ))
    head = model.get_output_embeddings()
    dtype = inner.norm.weight.dtype  # the model dtype (quantized modules keep their own storage dtypes)
    embed = _vocab_tensor(inner.embed_tokens, "embed_tokens", dtype)
    if getattr(head, "weight", None) is not None and head.weight is getattr(inner.embed_tokens, "weight", False):
        lm_head = embed
    else:
        lm_head = _vocab_tensor(head, "lm_head", dtype)
    from natix.engines.natix.spec import rope_tables

    return ModelWeights(spec, scheme, embed, layers, inner.norm.weight.detach(), lm_head,
                        rope_tables(model), kv_cache, rotate_keys=bool(getattr(model, "natix_kv_rotate_keys", False)),
                        kv_group_size=int(getattr(model, "natix_kv_group_size", -1)))


def _vocab_tensor(mod: Any, name: str, dtype: "torch.dtype") -> "torch.Tensor | Int8Rows":
    """The [V, D] table of an embedding or lm_head module: dense (nn.Embedding / nn.Linear without
    bias) or natix.quant.w8a16's int8 rows (Int8Embedding / W8A16Linear), read as ``dtype``."""
    from torch import nn

    from natix.quant.w8a16 import Int8Embedding, W8A16Linear

    if isinstance(mod, (Int8Embedding, W8A16Linear)) and getattr(mod, "bias", None) is None:
        return Int8Rows(mod.qweight.detach(), mod.scale.detach(), dtype)
    if type(mod) is nn.Embedding or (type(mod) is nn.Linear and mod.bias is None):
        return mod.weight.detach()
    raise EngineLoadError(f"the natix engine runs {name} in the model dtype or as int8 rows (w4a8kv4 "
                          f"embed_bits / lm_head_bits = 8), without a bias; this model's is a {type(mod).__name__}"
                          + (" with a bias" if getattr(mod, "bias", None) is not None else ""))


# ------------------------------------------------------------------------------------ random
def random_weights(spec: ModelSpec, scheme: str, *, device: Any = "cpu", dtype: Any = None, group_size: int = -1,
                   seed: int = 0, rope_theta: float = 500000.0,
                   rope: tuple["torch.Tensor", float] | None = None, embed_bits: int = 16,
                   lm_head_bits: int = 16) -> ModelWeights:
    """A random model of shape ``spec`` (weights ~ N(0, 0.02²), norms 1), quantized by round to
    nearest for ``fp8`` / ``w4a8kv4`` (``group_size`` 128, 64, 32 or -1 = per channel). For speed: what the
    GEMMs and caches see is exactly a served artifact's layout. ``rope``: (inv_freq, attention
    scaling) as transformers computes them for a config; by default plain RoPE at ``rope_theta``.
    ``embed_bits`` / ``lm_head_bits``: 16 (the model dtype) or 8 (:class:`Int8Rows`, as a w4a8kv4
    artifact exported with ``embed_bits=8`` / ``lm_head_bits=8``; a tied pair stays one object)."""
    import torch

    from natix.kernels.fp8_linear import quantize_fp8_weight
    from natix.kernels.packing import quantize_channel, quantize_progressive

    if scheme not in SCHEMES:
        raise EngineLoadError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    for name, bits in (("embed_bits", embed_bits), ("lm_head_bits", lm_head_bits)):
        if bits not in VOCAB_BITS or isinstance(bits, bool):
            raise EngineLoadError(f"{name} must be one of {', '.join(map(str, VOCAB_BITS))}, got {bits!r}")
    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def lin(n: int, k: int, bias: bool) -> LinearWeights:
        w = rnd(n, k)
        b = rnd(n) if bias else None
        if scheme == "dense":
            return LinearWeights("dense", n, k, w, b)
        if scheme == "fp8":
            return LinearWeights("fp8", n, k, quantize_fp8_weight(w), b)
        packed = quantize_progressive(w, group_size) if group_size > 0 else quantize_channel(w)
        return LinearWeights("w4a8", n, k, packed, b)

    ones = torch.ones(spec.hidden, device=device, dtype=dtype)
    layers = [LayerWeights(ones.clone(), ones.clone(), lin(spec.q_width + 2 * spec.kv_width, spec.hidden, spec.qkv_bias),
                           lin(spec.hidden, spec.q_width, spec.o_bias),
                           lin(2 * spec.intermediate, spec.hidden, spec.mlp_bias),
                           lin(spec.hidden, spec.intermediate, spec.mlp_bias)) for _ in range(spec.layers)]
    embed = rnd(spec.vocab, spec.hidden)
    lm_head = embed if spec.tie_embeddings else rnd(spec.vocab, spec.hidden)
    if spec.tie_embeddings and embed_bits == lm_head_bits == 8:
        embed = lm_head = Int8Rows.quantize(embed)
    else:
        embed = Int8Rows.quantize(embed) if embed_bits == 8 else embed
        lm_head = Int8Rows.quantize(lm_head) if lm_head_bits == 8 else lm_head
    if rope is None:
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32, device=device)
                                         / spec.head_dim))
        rope = (inv_freq, 1.0)
    else:
        rope = (rope[0].to(device), rope[1])
    return ModelWeights(spec, scheme, embed, layers, ones.clone(), lm_head, rope,
                        "int4" if scheme == "w4a8kv4" else "none",
                        {"random": True, "group_size": group_size, "embed_bits": embed_bits,
                         "lm_head_bits": lm_head_bits})


LLAMA3_8B = ModelSpec(arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                      vocab=128256, rms_eps=1e-5, max_positions=8192)
