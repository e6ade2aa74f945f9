"""QoQ transforms (natix.quant.qoq): untie + norm folding + rotation and per-block smoothing keep
the fp32 logits (rel. error < 1e-5), leave norms at one and lm_head untied, flatten planted
outlier channels, keep λ equal within RoPE pairs, and refuse layouts they cannot fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natix.quant.errors import QuantError
from natix.quant.qoq import (hadamard_matrix, head_rotation, prepare_model, rotate_value_heads, rotation_matrix,
                             smooth_block)

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def _ids(vocab: int, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.double()


@torch.no_grad()
def _perturb(model, seed: int = 0, outliers: bool = True):
    """Make the random model less trivial: γ ≠ 1, nonzero biases, larger weights, and (optionally)
    loud channels in k_proj / v_proj / up_proj outputs, as real LLMs have."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif p.dim() == 2:
            p.mul_(4.0)
    if outliers:
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.k_proj.weight[3].mul_(20.0)  # one member of a RoPE pair only
            a.v_proj.weight[5].mul_(20.0)
            m.up_proj.weight[7].mul_(20.0)
    return model


def _model(tiny, arch: str, hidden: int = 64, bias: bool = False):
    model = tiny.model(arch, hidden=hidden)
    if bias:  # o_proj / MLP biases too, so the writers' bias rotation and up-bias folding are exercised
        from transformers import AutoModelForCausalLM

        cfg = model.config
        cfg.attention_bias, cfg.mlp_bias = True, True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return _perturb(model)


def _smooth_all(model, ids: torch.Tensor, **kw) -> list[dict]:
    # Running the whole model is a valid run_block: the hooks only see this block, and the
    # transforms keep the function, so later blocks see the same inputs as the original.
    return [smooth_block(f"model.layers.{i}", layer, lambda: model(input_ids=ids, use_cache=False), **kw)
            for i, layer in enumerate(model.model.layers)]


# ----------------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 48, 64, 96, 576, 896])
def test_hadamard_orders(n: int) -> None:
    h = hadamard_matrix(n)
    assert h is not None and h.abs().eq(1).all()
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n,kind", [(64, "hadamard"), (48, "hadamard"), (184, "random-orthogonal")])
def test_rotation_matrix_orthogonal_and_seeded(n: int, kind: str) -> None:
    q, got = rotation_matrix(n, seed=3)
    assert got == kind
    assert (q @ q.t() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(q, rotation_matrix(n, seed=3)[0])
    assert not torch.equal(q, rotation_matrix(n, seed=4)[0])


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("hidden,rotate,kind", [(64, True, "hadamard"), (48, True, "hadamard"),
                                                (184, True, "random-orthogonal"), (64, False, None)])
def test_prepare_and_smooth_preserve_logits(tiny, arch: str, hidden: int, rotate: bool, kind) -> None:
    model = _model(tiny, arch, hidden)
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids)
    tied_before = model.lm_head.weight is model.model.embed_tokens.weight

    rep = prepare_model(model, rotate=rotate, seed=1)
    assert rep == {"untied": tied_before, "folded_norms": 1 + 2 * len(model.model.layers),
                   "rotation": kind, "seed": 1 if rotate else None}
    err_prepare = _rel(_logits(model, ids), ref)

    reports = _smooth_all(model, ids)
    err_smooth = _rel(_logits(model, ids), ref)
    print(f"{arch} H={hidden} rotate={rotate}: prepare {err_prepare:.2e}, +smooth {err_smooth:.2e}")
    assert err_prepare < TOL and err_smooth < TOL
    for r in reports:
        for key in ("attention_lambda", "v_o_scale", "up_down_scale"):
            assert 0 < r[key]["min"] <= r[key]["max"] < float("inf")


@pytest.mark.parametrize("rotate", [True, False])
def test_biases_everywhere_preserve_logits(tiny, rotate: bool) -> None:
    model = _model(tiny, "llama", 64, bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids)
    prepare_model(model, rotate=rotate)
    _smooth_all(model, ids, alpha=0.7)
    err = _rel(_logits(model, ids), ref)
    print(f"llama+biases rotate={rotate}: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("arch,bias", [("llama", False), ("llama", True), ("qwen2", False)])
def test_value_rotation_preserves_logits(tiny, arch: str, bias: bool) -> None:
    """V' = V·H per kv head folded into v_proj rows, Hᵀ into o_proj columns per query head (GQA:
    4 query heads over 2 kv heads): fp32 logits unchanged, alone and after prepare + smoothing."""
    model = _model(tiny, arch, 64, bias=bias)
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids)
    attn0 = model.model.layers[0].self_attn
    v_before = attn0.v_proj.weight.detach().clone()
    reps = [rotate_value_heads(f"model.layers.{i}", layer.self_attn) for i, layer in enumerate(model.model.layers)]
    assert reps[0] == {"prefix": "model.layers.0", "value_rotation": "hadamard"}
    assert not torch.allclose(attn0.v_proj.weight, v_before)
    err_alone = _rel(_logits(model, ids), ref)
    prepare_model(model, rotate=True, seed=1)
    _smooth_all(model, ids)
    for layer in model.model.layers:
        rotate_value_heads("l", layer.self_attn)
    err_all = _rel(_logits(model, ids), ref)
    print(f"{arch} bias={bias}: value rotation {err_alone:.2e}, +prepare/smooth/rotation {err_all:.2e}")
    assert err_alone < TOL and err_all < TOL


def test_value_rotation_without_a_hadamard_order(tiny) -> None:
    """head_dim 46 (hidden 184, 4 heads) has no Hadamard matrix here: the head rotation is the seeded
    random orthogonal matrix, and the fold is still exact."""
    model = _model(tiny, "llama", 184)
    ids = _ids(model.config.vocab_size)
    ref = _logits(model, ids)
    h = head_rotation(46)
    assert (h @ h.t() - torch.eye(46, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(h, head_rotation(46))
    rep = rotate_value_heads("model.layers.0", model.model.layers[0].self_attn)
    assert rep["value_rotation"] == "random-orthogonal"
    assert _rel(_logits(model, ids), ref) < TOL


def test_value_rotation_spreads_a_value_outlier(tiny) -> None:
    """The planted loud v_proj row (channel 5 of kv head 0) is spread evenly over the head: each
    value channel's range gets within a small factor of the others."""
    model = _model(tiny, "llama", 64)
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))

    def spread() -> float:
        amax = attn.v_proj(x).detach().abs().amax(0)[:d]
        return (amax.max() / amax.median()).item()

    before = spread()
    rotate_value_heads("model.layers.0", attn)
    after = spread()
    assert before > 5 and after < 2.5, (before, after)
    h = head_rotation(d)
    assert torch.allclose(h @ h.t(), torch.eye(d, dtype=torch.float64), atol=1e-12)


def test_prepare_model_state(tiny, tmp_path) -> None:
    """Norms are ones, lm_head is its own tensor, and a save/reload keeps it untied and equal."""
    from transformers import AutoModelForCausalLM

    model = _model(tiny, "qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prepare_model(model, rotate=True)
    norms = [m.weight for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 1 + 2 * len(model.model.layers)
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False

    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    ids = _ids(model.config.vocab_size)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


# ---------------------------------------------------------------------------------- smoothing


def _channel_max(module: nn.Module, model, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().flatten(0, -2).amax(0)))
    _logits(model, ids)
    h.remove()
    return torch.stack(seen).amax(0)


def test_smoothing_flattens_planted_outliers(tiny) -> None:
    model = _model(tiny, "llama")
    prepare_model(model, rotate=True)
    ids = _ids(model.config.vocab_size)
    layer = model.model.layers[0]
    targets = {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
    before = {k: _channel_max(m, model, ids) for k, m in targets.items()}
    smooth_block("model.layers.0", layer, lambda: model(input_ids=ids, use_cache=False))
    after = {k: _channel_max(m, model, ids) for k, m in targets.items()}
    for k in targets:
        rb = (before[k].max() / before[k].mean()).item()
        ra = (after[k].max() / after[k].mean()).item()
        print(f"{k} input max/mean of channel maxima: {rb:.2f} -> {ra:.2f}")
        assert rb > 4.0 and ra < rb / 2


def test_lambda_shared_within_rope_pairs(tiny) -> None:
    model = _model(tiny, "llama")  # k_proj row 3 is loud; its RoPE partner (3 + d/2) is not
    attn = model.model.layers[0].self_attn
    d, n_kv = attn.head_dim, attn.k_proj.out_features // attn.head_dim
    k0, q0 = attn.k_proj.weight.clone(), attn.q_proj.weight.clone()
    ids = _ids(model.config.vocab_size)
    smooth_block("model.layers.0", model.model.layers[0], lambda: model(input_ids=ids, use_cache=False),
                 smooth_outputs=False)
    lam = (k0 / attn.k_proj.weight)[:, 0].view(n_kv, d)  # k rows ÷ λ
    assert torch.allclose(lam[:, : d // 2], lam[:, d // 2:], rtol=1e-6)
    assert lam[0, 3] > 3 * lam[0, 4]  # the planted channel got a large λ, and so did its partner
    q_scale = (attn.q_proj.weight / q0)[:, 0].view(n_kv, -1, d)  # q rows × λ, shared by the group
    assert torch.allclose(q_scale, lam[:, None, :].expand_as(q_scale), rtol=1e-5)


# ------------------------------------------------------------------------------------- errors


def test_layernorm_is_refused(tiny) -> None:
    model = tiny.model("llama")
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(model.config.hidden_size)
    with pytest.raises(QuantError, match=r"LlamaForCausalLM.*'llama'.*layers\.1\.post_attention_layernorm.*LayerNorm"):
        prepare_model(model, rotate=True)


def test_unknown_model_type_is_refused(tiny) -> None:
    model = tiny.model("llama")
    model.config.model_type = "gemma"
    with pytest.raises(QuantError, match=r"support model types.*'gemma'"):
        prepare_model(model, rotate=False)


def test_missing_module_is_refused(tiny) -> None:
    model = tiny.model("qwen2")
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(QuantError, match=r"Qwen2ForCausalLM.*layer 0 has no mlp\.gate_proj"):
        prepare_model(model, rotate=False)


def test_lm_head_not_reading_final_norm_is_refused(tiny) -> None:
    model = tiny.model("llama")
    # e.g. a logit scale between the norm and the head
    model.lm_head.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
    with pytest.raises(QuantError, match="does not read the final norm"):
        prepare_model(model, rotate=True)


def test_smooth_block_needs_run_block_to_run_it(tiny) -> None:
    model = tiny.model("llama")
    with pytest.raises(QuantError, match="never ran k_proj"):
        smooth_block("model.layers.0", model.model.layers[0], lambda: None)


# ------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_rotate_and_smooth_parity() -> None:
    from natix.quant.models import load_base

    model, _ = load_base("smollm2-135m", dtype="fp32")
    ids = _ids(model.config.vocab_size, batch=1, length=32)
    ref = _logits(model, ids)
    rep = prepare_model(model, rotate=True)
    assert rep["rotation"] == "hadamard" and rep["untied"]
    err_prepare = _rel(_logits(model, ids), ref)
    _smooth_all(model, ids)
    err = _rel(_logits(model, ids), ref)
    print(f"SmolLM2-135M: prepare {err_prepare:.2e}, +smooth {err:.2e}")
    assert err_prepare < TOL and err < TOL


def test_mistral_with_explicit_head_dim(tiny) -> None:
    """head_dim (32) ≠ hidden / heads (24): geometry comes from the attention module, not H."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    cfg = MistralConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, vocab_size=128)
    model = _perturb(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())
    ids = _ids(128)
    ref = _logits(model, ids)
    assert prepare_model(model, rotate=True)["rotation"] == "hadamard"
    _smooth_all(model, ids)
    err = _rel(_logits(model, ids), ref)
    print(f"mistral H=96 d=32: {err:.2e}")
    assert err < TOL
