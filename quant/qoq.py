"""Function-preserving model transforms of QServe's QoQ recipe (W4A8KV4, arXiv 2405.04532).

Each transform rewrites weights so that the float model computes the same function, while the
tensors that will be quantized (weights, per-token INT8 activations, UINT4 keys/values) get
flatter channel ranges:

- :func:`prepare_model` (whole model, once, before any quantization): untie ``lm_head`` from
  ``embed_tokens``, fold every RMSNorm weight γ into the linears that read the norm (γ ← 1), and
  optionally rotate the residual stream by an orthogonal ``Q [H, H]``. Because γ = 1 the norm is
  ``x / rms(x)`` and ``rms(x Q) = rms(x)``, so the rotation commutes with it; all of it is folded
  into weights offline, so no online Hadamard kernel is needed at inference.
- :func:`smooth_block` (per decoder layer, on calibration activations): SmoothAttention
  (keys ÷ λ, queries × λ, λ shared per RoPE pair) and SmoothQuant-style smoothing of the two
  block-internal activations that the rotation cannot reach (``o_proj`` and ``down_proj`` inputs),
  folded into ``v_proj`` / ``up_proj``.

Supported: HF Llama-family decoders (``model.model.{embed_tokens, layers, norm}``, ``lm_head``;
layers with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``) whose ``model_type`` is in :data:`SUPPORTED_MODEL_TYPES`, with RoPE
in transformers' ``rotate_half`` convention (dims ``i`` and ``i + rotary_dim/2`` form a pair).
Anything else raises :class:`QoqError` naming the architecture.

Shapes: ``H`` hidden size, ``V`` vocabulary, ``I`` MLP width, ``d`` head dim, ``n_q`` / ``n_kv``
query / key-value heads, ``g = n_q // n_kv`` (GQA group). Linear weights are ``[out, in]``.

torch is imported at top: only the w4a8kv4 scheme's methods import this module, and
``import natix.quant`` does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from natix.quant.errors import QuantError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
"""Families checked to match the layout above (no q/k norms, no embedding scale, no logit cap)."""

SCALE_MIN = 1e-5
SCALE_MAX = 1e5  # bounds for λ and s: a near-dead channel must not blow a weight row up to inf


class QoqError(QuantError, ValueError):
    """The model or block cannot take the QoQ transforms; the message names the architecture/module."""


# ----------------------------------------------------------------------------------- rotations


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``[q, q]`` matrix ``χ(j − i)`` of the quadratic-residue character mod prime ``q`` (χ(0) = 0)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> Optional[torch.Tensor]:
    """±1 Hadamard matrix of order ``m`` by Paley's construction I or II (prime ``q`` only), or None."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I, order q + 1
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II, order 2(q + 1)
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def hadamard_matrix(n: int) -> Optional[torch.Tensor]:
    """A ±1 matrix ``[n, n]`` (float64) with ``A Aᵀ = n I``, or None if none can be built here.

    Built as Sylvester ``2^a`` ⊗ Paley ``m`` for ``n = 2^a · m`` (Paley I/II over a prime field);
    covers every power of two and e.g. 48, 96, 576 (16 ⊗ 36), 896 (32 ⊗ 28), 3072, 5120.
    """
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    m = n
    while m >= 1:
        base = torch.ones(1, 1, dtype=torch.float64) if m in (1, 2) else _paley(m)
        if base is not None:
            out = base
            while out.shape[0] < n:
                out = torch.kron(h2, out)
            return out
        if m % 2:
            return None
        m //= 2
    return None


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Orthogonal ``Q [n, n]`` float64 and its kind (``"hadamard"`` or ``"random-orthogonal"``).

    A normalised Hadamard matrix with seeded random ±1 row signs where one can be built (its
    entries all have magnitude 1/√n, which spreads an outlier channel evenly over all channels);
    else a seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by diag(R) > 0).
    """
    g = torch.Generator().manual_seed(seed)
    h = hadamard_matrix(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return signs[:, None] * h / n ** 0.5, "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random-orthogonal"


# ------------------------------------------------------------------------------ model checking


def _arch(model: Any) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {mt!r})"


def _is_rmsnorm(m: Any) -> bool:
    return (isinstance(m, nn.Module) and type(m).__name__.endswith("RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and getattr(m, "bias", None) is None)


def _check_model(model: Any) -> None:
    """Raise QoqError unless ``model`` has exactly the layout the transforms assume."""
    arch = _arch(model)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise QoqError(f"QoQ transforms support model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {arch}")
    inner = getattr(model, "model", None)
    for path in ("model.embed_tokens", "model.layers", "model.norm", "lm_head"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise QoqError(f"{arch}: missing module {path}; QoQ needs a Llama-style decoder layout")
    if not isinstance(model.lm_head, nn.Linear) or model.lm_head.bias is not None:
        raise QoqError(f"{arch}: lm_head must be a bias-free nn.Linear, found {type(model.lm_head).__name__}")
    norms = [("model.norm", inner.norm)]
    for i, layer in enumerate(inner.layers):
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            obj = layer
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise QoqError(f"{arch}: layer {i} has no {path}; QoQ needs a Llama-style decoder layer")
            if path.endswith("_proj") and not isinstance(obj, nn.Linear):
                raise QoqError(f"{arch}: model.layers.{i}.{path} is {type(obj).__name__}, expected nn.Linear "
                               "(run the QoQ transforms before any module is replaced)")
        norms += [(f"model.layers.{i}.input_layernorm", layer.input_layernorm),
                  (f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm)]
        # A norm elsewhere in the layer (q/k norms, sandwich norms) would not commute with the
        # rotation or SmoothAttention.
        known = {id(layer.input_layernorm), id(layer.post_attention_layernorm)}
        extra = [n for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() and id(m) not in known]
        if extra:
            raise QoqError(f"{arch}: layer {i} has extra norm modules {extra}; QoQ cannot fold them")
    for name, norm in norms:
        if not _is_rmsnorm(norm):
            raise QoqError(f"{arch}: {name} is {type(norm).__name__}; QoQ folds only bias-free RMSNorm "
                           "(a LayerNorm's mean subtraction and bias do not commute with the rotation)")


@torch.no_grad()
def _check_lm_head_reads_norm(model: Any) -> None:
    """Run 4 tokens and check ``lm_head``'s input is the final norm's output, bit for bit."""
    seen: dict[str, torch.Tensor] = {}
    h1 = model.model.norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out))
    h2 = model.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    try:
        n = min(4, model.model.embed_tokens.num_embeddings)
        ids = torch.arange(n, device=model.model.embed_tokens.weight.device)[None, :]
        model(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    norm, head = seen.get("norm"), seen.get("head")
    if norm is None or head is None or norm.shape[-1] != head.shape[-1] or not torch.equal(
            norm[:, -head.shape[1]:], head):
        raise QoqError(f"{_arch(model)}: lm_head does not read the final norm's output directly; "
                       "folding the norm into lm_head would change the model")


# ---------------------------------------------------------------------------------- weight folds


def _scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    """``W[:, j] ← W[:, j] · s_j`` (s ``[in]``), computed in float64."""
    w = lin.weight
    w.copy_((w.double() * s.to(w.device, torch.float64)[None, :]).to(w.dtype))


def _scale_rows(lin: nn.Linear, s: torch.Tensor) -> None:
    """``W[i, :] ← W[i, :] · s_i`` and ``b_i ← b_i · s_i`` (s ``[out]``), computed in float64."""
    s = s.to(lin.weight.device, torch.float64)
    lin.weight.copy_((lin.weight.double() * s[:, None]).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() * s).to(lin.bias.dtype))


def _rotate_reader(lin: nn.Linear | nn.Embedding, q: torch.Tensor) -> None:
    """``W ← W Q``: the module reads (or, for the embedding, produces rows in) the rotated stream."""
    w = lin.weight
    w.copy_((w.double() @ q.to(w.device)).to(w.dtype))


def _rotate_writer(lin: nn.Linear, q: torch.Tensor) -> None:
    """``W ← Qᵀ W``, ``b ← Qᵀ b``: the module's output lands in the rotated stream."""
    q = q.to(lin.weight.device)
    lin.weight.copy_((q.t() @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((q.t() @ lin.bias.double()).to(lin.bias.dtype))


def _untie(model: Any) -> bool:
    emb, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    # Also when already untied: a saved config must rebuild an untied lm_head.
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return tied


@torch.no_grad()
def prepare_model(model: Any, *, rotate: bool, seed: int = 0) -> dict[str, Any]:
    """Untie, fold RMSNorm weights and optionally rotate the residual stream, in place.

    ``model``: a float HF causal LM of a family in :data:`SUPPORTED_MODEL_TYPES`, before any
    module is quantized. Steps (each exact in real arithmetic; computed in float64, cast back):

    1. ``lm_head`` gets its own copy of a tied ``embed_tokens [V, H]`` and
       ``config.tie_word_embeddings = False``, so the two can be rotated/quantized separately.
    2. Every RMSNorm's γ ``[H]`` is folded into the columns of its readers (input_layernorm →
       q/k/v, post_attention_layernorm → gate/up, final norm → lm_head) and set to ones.
    3. With ``rotate``: ``Q = rotation_matrix(H, seed)``; ``embed_tokens ← E Q``; readers
       (q/k/v, gate/up, lm_head) ``W ← W Q``; writers (o_proj, down_proj) ``W ← Qᵀ W``,
       ``b ← Qᵀ b``. The residual stream then carries ``h Q``. It is folded into the weights
       offline, so inference needs no online Hadamard transform.

    Returns a JSON-able report ``{"untied", "folded_norms", "rotation", "seed"}``. Raises
    :class:`QoqError` for a model whose layout the transforms do not fit.
    """
    _check_model(model)
    _check_lm_head_reads_norm(model)
    untied = _untie(model)
    inner = model.model
    readers = [(inner.norm, [model.lm_head])]
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        readers += [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                    (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]
    for norm, lins in readers:
        gamma = norm.weight.detach().double()
        for lin in lins:
            _scale_columns(lin, gamma)
        norm.weight.fill_(1.0)
    kind = None
    if rotate:
        q, kind = rotation_matrix(inner.embed_tokens.weight.shape[1], seed)
        _rotate_reader(inner.embed_tokens, q)
        _rotate_reader(model.lm_head, q)
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                _rotate_reader(lin, q)
            _rotate_writer(a.o_proj, q)
            _rotate_writer(m.down_proj, q)
    return {"untied": untied, "folded_norms": len(readers), "rotation": kind, "seed": seed if rotate else None}


# ------------------------------------------------------------------------------------ smoothing


def _geometry(prefix: str, attn: Any) -> tuple[int, int, int, int]:
    """(head_dim d, n_q, n_kv, rotary_dim) of an attention module, checked against its projections."""
    cfg = getattr(attn, "config", None)
    d = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if not d:
        raise QoqError(f"{prefix}.self_attn: cannot tell the head dim ({type(attn).__name__} has no head_dim)")
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    n_q, n_kv = q.out_features // d, k.out_features // d
    if (q.out_features % d or k.out_features % d or v.out_features != k.out_features
            or o.in_features != q.out_features or n_kv == 0 or n_q % n_kv):
        raise QoqError(f"{prefix}.self_attn: projections q {q.out_features}, k {k.out_features}, "
                       f"v {v.out_features}, o_in {o.in_features} do not fit head_dim {d} with GQA")
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = getattr(cfg, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor") if isinstance(
        rope, dict) else None) or 1.0
    rot = int(d * factor)
    if rot % 2 or rot > d:
        raise QoqError(f"{prefix}.self_attn: rotary dim {rot} (head_dim {d} × {factor}) is not even")
    return d, n_q, n_kv, rot


def rope_pair_max(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``[..., d]`` → same shape, where dims ``i`` and ``i + rotary_dim/2`` (``i < rotary_dim/2``)
    both hold the max of the two; dims past ``rotary_dim`` are not rotated and keep their value."""
    half = rotary_dim // 2
    out = x.clone()
    m = torch.maximum(x[..., :half], x[..., half:rotary_dim])
    out[..., :half] = m
    out[..., half:rotary_dim] = m
    return out


def _scale_from(xmax: torch.Tensor, wmax: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """``xmax^α / wmax^(1−α)`` (float64); channels without signal (a max of 0) keep scale 1."""
    x = xmax.double()
    s = x.clamp(min=SCALE_MIN).pow(alpha)
    live = x > 0
    if wmax is not None:
        w = wmax.double()
        s = s / w.clamp(min=SCALE_MIN).pow(1 - alpha)
        live &= w > 0
    return torch.where(live, s, torch.ones_like(s)).clamp(SCALE_MIN, SCALE_MAX)


def _stats(t: torch.Tensor) -> dict[str, float]:
    return {"min": float(t.min()), "max": float(t.max())}


class _AbsMax:
    """Running per-channel max |x| over every call (x ``[..., C]`` → ``[C]`` float32)."""

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None
        self.calls = 0

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.value = m if self.value is None else torch.maximum(self.value, m)
        self.calls += 1


@torch.no_grad()
def smooth_block(prefix: str, block: Any, run_block: Callable[[], Any], *, alpha: float = 0.5,
                 smooth_attention: bool = True, smooth_outputs: bool = True) -> dict[str, Any]:
    """Smooth one decoder layer in place from its calibration activations.

    ``run_block()`` must run ``block`` on every calibration input; forward hooks around that call
    collect per-channel max |·| of the ``k_proj`` outputs ``[n_kv·d]`` and of the ``o_proj``
    ``[n_q·d]`` / ``down_proj`` ``[I]`` inputs, and are removed afterwards. Then, exactly:

    - SmoothAttention: ``λ = max|K|^α`` per key channel ``[n_kv, d]``, shared across each RoPE
      pair (max of the pair's statistics): RoPE rotates a pair by an angle, which commutes with
      scaling both members by the same λ, so ``k ÷ λ`` / ``q × λ`` are exact and can be folded
      before RoPE. The statistic is taken pre-RoPE; since RoPE only mixes the two members of a
      pair, the pair max bounds the post-RoPE magnitude to within √2, a good proxy of its range.
      ``k_proj`` rows (+bias) ← ÷λ; ``q_proj`` rows (+bias) of the g query heads of each kv head ← ×λ.
    - Block-output smoothing (SmoothQuant): ``s = max|X|^α / max|W_{:,j}|^(1−α)``. ``o_proj``
      columns ← ×s and ``v_proj`` rows (+bias) ← ÷s. Output channel (head h, dim i) of attention
      comes from kv head ``h // g``, so s is computed per kv channel ``[n_kv, d]`` from the max over
      the g query heads and shared by them. ``down_proj`` columns ← ×s, ``up_proj`` rows (+bias)
      ← ÷s (its input is ``act(gate) · up``, linear in ``up``).

    Scales are clamped to ``[SCALE_MIN, SCALE_MAX]``; a channel with max 0 keeps scale 1.
    Returns a JSON-able report with the min/max of λ and of both s.
    """
    if not 0.0 <= alpha <= 1.0:
        raise QoqError(f"{prefix}: smoothing alpha must be in [0, 1], got {alpha}")
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names) \
            or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("up_proj", "down_proj")):
        raise QoqError(f"{prefix} ({type(block).__name__}): QoQ smoothing needs nn.Linear "
                       "self_attn.{q,k,v,o}_proj and mlp.{up,down}_proj")
    d, n_q, n_kv, rot = _geometry(prefix, attn)
    g = n_q // n_kv
    report: dict[str, Any] = {"prefix": prefix, "alpha": alpha}
    if not (smooth_attention or smooth_outputs):
        return report

    k_max, o_in, down_in = _AbsMax(), _AbsMax(), _AbsMax()
    hooks = []
    if smooth_attention:
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, out: k_max.add(out)))
    if smooth_outputs:
        hooks.append(attn.o_proj.register_forward_pre_hook(lambda m, a: o_in.add(a[0])))
        hooks.append(mlp.down_proj.register_forward_pre_hook(lambda m, a: down_in.add(a[0])))
    try:
        run_block()
    finally:
        for h in hooks:
            h.remove()
    wanted = ([("k_proj", k_max)] if smooth_attention else []) + (
        [("o_proj", o_in), ("down_proj", down_in)] if smooth_outputs else [])
    for name, acc in wanted:
        if acc.value is None:
            raise QoqError(f"{prefix}: run_block() never ran {name}; it must run this block on the "
                           "calibration inputs")
    report["calls"] = max(k_max.calls, o_in.calls, down_in.calls)

    if smooth_attention:
        lam = _scale_from(rope_pair_max(k_max.value.view(n_kv, d), rot), None, alpha)  # [n_kv, d]
        _scale_rows(attn.k_proj, (1.0 / lam).flatten())
        _scale_rows(attn.q_proj, lam[:, None, :].expand(n_kv, g, d).flatten())
        report["attention_lambda"] = _stats(lam)

    if smooth_outputs:
        x = o_in.value.view(n_kv, g, d).amax(1)
        w = attn.o_proj.weight.detach().abs().amax(0).view(n_kv, g, d).amax(1)
        s = _scale_from(x, w, alpha)  # [n_kv, d]
        _scale_columns(attn.o_proj, s[:, None, :].expand(n_kv, g, d).flatten())
        _scale_rows(attn.v_proj, (1.0 / s).flatten())
        report["v_o_scale"] = _stats(s)

        s = _scale_from(down_in.value, mlp.down_proj.weight.detach().abs().amax(0), alpha)  # [I]
        _scale_columns(mlp.down_proj, s)
        _scale_rows(mlp.up_proj, 1.0 / s)
        report["up_down_scale"] = _stats(s)
    return report


# ------------------------------------------------------------------------- head-dim rotations


def head_rotation(d: int) -> torch.Tensor:
    """The orthogonal ``H [d, d]`` (float64, ``H Hᵀ = I``) used inside every head: the normalised
    Hadamard of order ``d`` (no random signs) where one can be built, else the seeded (seed 0)
    random orthogonal matrix of :func:`rotation_matrix`. A function of ``d`` alone, so an engine
    rebuilds it from the head dim (the key rotation is applied at run time)."""
    h = hadamard_matrix(d)
    if h is None:
        return rotation_matrix(d, seed=0)[0]
    return h / d ** 0.5


@torch.no_grad()
def rotate_value_heads(prefix: str, attn: Any) -> dict[str, Any]:
    """Rotate every head's values by ``H = head_rotation(d)`` and fold the inverse into ``o_proj``.

    ``v_proj`` rows of kv head ``j`` (+bias) ``W_j ← Hᵀ W_j`` so it emits ``v_j H``; attention's
    output for a query head is a convex combination of its kv head's value rows, so it is
    ``a_h H``, and ``o_proj`` columns of query head ``h`` ``W_h ← W_h H`` undo it (``H Hᵀ = I``).
    Exact in real arithmetic (computed in float64), in place; the KV cache then stores ``v H``,
    whose outlier channels are spread over the head. Returns ``{"prefix", "value_rotation"}``
    (``"hadamard"``, or ``"random-orthogonal"`` for a head dim without a Hadamard matrix here).
    """
    d, n_q, n_kv, _ = _geometry(prefix, attn)
    h = head_rotation(d)
    v, o = attn.v_proj, attn.o_proj
    hv = h.to(v.weight.device)
    w = v.weight.double().view(n_kv, d, -1)
    v.weight.copy_(torch.einsum("ji,kjc->kic", hv, w).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(n_kv, d) @ hv).flatten().to(v.bias.dtype))
    ho = h.to(o.weight.device)
    w = o.weight.double().view(o.out_features, n_q, d)
    o.weight.copy_((w @ ho).reshape(o.weight.shape).to(o.weight.dtype))
    return {"prefix": prefix, "value_rotation": "hadamard" if hadamard_matrix(d) is not None else "random-orthogonal"}
