"""W4A8Linear against the kernels' reference (bit for bit), GPTQ -> packed format, dtype keeping,
and the w4a8kv4 config: JSON round trip, validation, per-channel fallback, empty_linear parity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from natix.kernels.packing import quantize_channel, quantize_progressive
from natix.kernels.rmsnorm_quant import rmsnorm_quant_reference
from natix.kernels.w4a8_gemm import w4a8_gemm_reference
from natix.quant.errors import QuantError
from natix.quant.gptq import AffineGrid, ProgressiveGrid, gptq_quantize
from natix.quant.schemes import config_from_dict, known_schemes
from natix.quant.w4a8 import W4A8Linear
from natix.quant.w4a8kv4_config import W4A8KV4Config


def _reference(x: torch.Tensor, packed, bias) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs, _ = rmsnorm_quant_reference(x2, None)
    return w4a8_gemm_reference(xq, xs, packed, bias, out_dtype=x.dtype).reshape(*x.shape[:-1], -1)


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("group_size", [128, 64, 32, -1])
@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (2, 5, 256)])
def test_forward_equals_kernel_reference(group_size, shape):
    lin = _linear(256, 96)
    mod = W4A8Linear.from_linear(lin, group_size=group_size)
    packed = quantize_progressive(lin.weight, group_size) if group_size > 0 else quantize_channel(lin.weight)
    for name, t in packed.state_dict().items():
        assert torch.equal(getattr(mod, name), t), name
    x = torch.randn(*shape)
    y = mod(x)
    assert y.shape == (*shape[:-1], 96) and y.dtype == torch.float32
    assert torch.equal(y, _reference(x, packed, lin.bias))
    # and it is a W4A8 approximation of the float layer, not just some number
    ref = lin(x)
    assert 0 < ((y - ref).norm() / ref.norm()).item() < 0.15


def test_state_dict_is_the_kernel_format():
    g = W4A8Linear.from_linear(_linear(256, 64), group_size=128)
    c = W4A8Linear.from_linear(_linear(256, 64, bias=False), group_size=-1)
    sg = {k: (v.dtype, tuple(v.shape)) for k, v in g.state_dict().items()}
    sc = {k: (v.dtype, tuple(v.shape)) for k, v in c.state_dict().items()}
    assert sg == {"qweight": (torch.uint8, (32, 256)), "scale": (torch.float32, (64,)),
                  "group_scale": (torch.uint8, (2, 64)), "group_zero": (torch.uint8, (2, 64)),
                  "bias": (torch.float32, (64,))}
    assert sc == {"qweight": (torch.uint8, (32, 256)), "scale": (torch.float32, (64,)), "zero": (torch.uint8, (64,))}
    assert g.layer_meta() == {"group_size": 128} and c.layer_meta() == {"group_size": -1}


def _hessian(k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # correlated channels (a low-rank mix + noise), as real activations are: GPTQ's error feedback
    # has somewhere to put each rounding error
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.1 * torch.randn(512, k, generator=g)
    return x, (2 * x.T.double() @ x.double() / x.shape[0])


@pytest.mark.parametrize("grid,gs", [(ProgressiveGrid(), 128), (ProgressiveGrid(), 64), (AffineGrid(bits=4), -1)])
def test_from_gptq_matches_gptq_result(grid, gs):
    lin = _linear(256, 64)
    _, H = _hessian(256)
    res = gptq_quantize(lin.weight.detach(), H, grid, group_size=gs, act_order=gs == -1)
    mod = W4A8Linear.from_gptq(res, grid, bias=lin.bias)
    # the packed weight represents exactly what GPTQ computed
    from natix.kernels.packing import dequantize

    assert torch.equal(dequantize(mod.packed()), res.dequantized)
    x = torch.randn(3, 256)
    assert torch.equal(mod(x), _reference(x, mod.packed(), lin.bias))


def test_from_gptq_rejects_other_grids():
    lin = _linear(256, 64)
    res = gptq_quantize(lin.weight.detach(), torch.eye(256), AffineGrid(bits=4), group_size=128)
    with pytest.raises(QuantError, match="group_size=128"):
        W4A8Linear.from_gptq(res, AffineGrid(bits=4))


def test_dtype_kept_on_model_to():
    mod = W4A8Linear.from_linear(_linear(256, 64), group_size=128)
    seq = torch.nn.Sequential(mod).to(torch.bfloat16)
    assert mod.scale.dtype == torch.float32 and mod.qweight.dtype == torch.uint8
    assert mod.group_scale.dtype == torch.uint8 and mod.bias.dtype == torch.bfloat16
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y = seq(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, _reference(x, mod.packed(), mod.bias))
    seq.float()
    assert mod.scale.dtype == torch.float32 and mod.bias.dtype == torch.float32


def test_odd_n_and_bad_k_errors():
    with pytest.raises(QuantError, match="even out_features"):
        W4A8Linear(256, 63)
    with pytest.raises(QuantError, match="even"):
        W4A8Linear.from_linear(_linear(256, 63))
    with pytest.raises(QuantError, match="in_features % 128"):
        W4A8Linear(200, 64, group_size=128)
    with pytest.raises(QuantError, match=r"in_features % 128.*group_size=64 divides it"):
        W4A8Linear(576, 64, group_size=128)
    with pytest.raises(QuantError, match="group_size must be one of"):
        W4A8Linear(256, 64, group_size=16)
    assert W4A8Linear(576, 64, group_size=64).group_scale.shape == (9, 64)


# ------------------------------------------------------------------------------------------ config


def test_config_registered_and_round_trips():
    assert "w4a8kv4" in known_schemes()
    cfg = W4A8KV4Config(group_size=-1, kv_cache="none", gptq=False, smooth_alpha=0.3, ignore=["lm_head", "x"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["scheme"] == "w4a8kv4" and d["version"] == 1 and d["ignore"] == ["lm_head", "x"]
    back = config_from_dict(d)
    assert back == cfg and isinstance(back.ignore, tuple)
    assert config_from_dict({"scheme": "w4a8kv4"}) == W4A8KV4Config()


@pytest.mark.parametrize("bad", [
    {"group_size": 16}, {"group_size": 256}, {"group_size": True}, {"group_fallback": "tensor"},
    {"weight_scale": "absmax"}, {"act_order": "yes"}, {"kv_cache": "fp8"}, {"gptq": "yes"},
    {"smooth_alpha": 1.5}, {"percdamp": -0.1}, {"seed": 1.5}, {"version": 2}, {"bogus": 1},
    {"kv_group_size": 8}, {"kv_group_size": 48}, {"kv_group_size": 0}, {"kv_group_size": True},
    {"kv_key_block": 8}, {"kv_key_block": 48}, {"kv_key_block": 2048}, {"kv_key_block": True},
    {"kv_key_block": 64, "kv_cache": "none"}, {"kv_key_block": 64, "rotate_keys": True},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(QuantError):
        config_from_dict({"scheme": "w4a8kv4", **bad})


def test_value_rotation_alone_runs_the_block_hook(tiny):
    """rotate_values with every other transform off still calibrates (prepare_block is where it runs)
    and keeps the function; the manifest's transforms record both rotation options."""
    cfg = W4A8KV4Config(gptq=False, rotate=False, smooth_attention=False, smooth_outputs=False, rotate_values=True)
    assert cfg.needs_calibration() and not cfg.needs_hessians()
    model = tiny.model("llama")
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report: dict = {}
    for i, block in enumerate(model.model.layers):
        cfg.prepare_block(f"model.layers.{i}", block, lambda: None, report)
    assert set(report) == {"qoq_value_rotation"}
    with torch.no_grad():
        assert ((model(ids).logits - ref).norm() / ref.norm()).item() < 1e-5
    t = W4A8KV4Config(rotate_keys=True).hf_quantization_config()["transforms"]
    assert t["rotate_keys"] is True and t["rotate_values"] is True  # values on by default, keys opt-in


def test_manifest_without_rotation_fields_reads_as_before():
    """An artifact written before rotate_values / rotate_keys existed loads with both off, whatever
    the defaults; a new manifest round-trips them."""
    from natix.quant.schemes import config_from_dict

    old = W4A8KV4Config().to_dict()
    del old["rotate_values"], old["rotate_keys"]
    cfg = config_from_dict(old)
    assert cfg.rotate_values is False and cfg.rotate_keys is False
    assert W4A8KV4Config().rotate_values and not W4A8KV4Config().rotate_keys  # new exports: values rotated
    partial = config_from_dict({"scheme": "w4a8kv4", "group_size": -1, "rotate_keys": True})  # partial: defaults
    assert partial.rotate_keys is True and partial.rotate_values is True
    new = W4A8KV4Config(rotate_values=True, rotate_keys=True)
    assert config_from_dict(new.to_dict()) == new
    # group_fallback: "finer" did not exist; an old manifest that does not say meant "channel"
    del old["group_fallback"]
    assert config_from_dict(old).group_fallback == "channel"
    assert W4A8KV4Config().group_fallback == "finer"
    assert config_from_dict(W4A8KV4Config(group_size=64).to_dict()).group_size == 64
    # kv_group_size: one KV4 scale per head before the option (and by default)
    del old["kv_group_size"]
    assert config_from_dict(old).kv_group_size == -1 == W4A8KV4Config().kv_group_size
    kv = W4A8KV4Config(kv_group_size=16).hf_quantization_config()
    assert kv["kv_group_size"] == 16 and kv["kv_cache_scheme"]["group_size"] == 16
    assert W4A8KV4Config(kv_group_size=-1).hf_quantization_config()["kv_cache_scheme"]["strategy"] == "token-head"
    # kv_key_block: keys per token before the option (and by default)
    del old["kv_key_block"]
    assert config_from_dict(old).kv_key_block == 0 == W4A8KV4Config().kv_key_block
    kb = W4A8KV4Config(kv_key_block=64).hf_quantization_config()
    assert kb["kv_key_block"] == 64 and kb["kv_cache_scheme"]["key_strategy"] == "channel-block"
    assert kb["kv_cache_scheme"]["key_block_tokens"] == 64
    assert "key_strategy" not in W4A8KV4Config().hf_quantization_config()["kv_cache_scheme"]


def test_needs_calibration():
    assert W4A8KV4Config().needs_calibration()
    assert not W4A8KV4Config(gptq=False, smooth_attention=False, smooth_outputs=False,
                             rotate_values=False).needs_calibration()
    assert W4A8KV4Config(gptq=False, smooth_attention=False, smooth_outputs=True).needs_calibration()


def test_group_fallback_finer_channel_and_error():
    cfg = W4A8KV4Config(gptq=False)  # group_fallback="finer" by default
    lin576 = _linear(576, 64)
    mod = cfg.quantize_linear(lin576, name="model.layers.0.self_attn.q_proj")
    assert mod.layer_meta() == {"group_size": 64}
    assert cfg.quantize_linear(_linear(256, 64), name="x").layer_meta() == {"group_size": 128}
    assert cfg.layer_group_size(96, 64) == 32 and cfg.layer_group_size(200, 64) == -1  # 96 = 3 x 32; 200: none
    assert W4A8KV4Config(group_size=64).layer_group_size(96, 64) == 32
    channel = W4A8KV4Config(group_fallback="channel", gptq=False)
    assert channel.quantize_linear(lin576, name="q").layer_meta() == {"group_size": -1}
    assert W4A8KV4Config(group_size=-1, gptq=False).quantize_linear(_linear(256, 64)).layer_meta() == {"group_size": -1}
    strict = W4A8KV4Config(group_fallback="error", gptq=False)
    with pytest.raises(QuantError, match=r"model\.layers\.0\.self_attn\.q_proj.*576.*group_fallback='finer'"):
        strict.quantize_linear(lin576, name="model.layers.0.self_attn.q_proj")
    with pytest.raises(QuantError, match="out_features=63"):
        cfg.quantize_linear(_linear(256, 63), name="odd")


@pytest.mark.parametrize("k", [256, 576])
def test_gptq_beats_rtn_on_calibration_error(k):
    lin = _linear(k, 64, seed=3)
    x, H = _hessian(k)
    gptq = W4A8KV4Config().quantize_linear(lin, name="l", hessian=H)
    rtn = W4A8KV4Config().quantize_linear(lin, name="l", hessian=None)
    off = W4A8KV4Config(gptq=False).quantize_linear(lin, name="l", hessian=H)
    from natix.kernels.packing import dequantize

    ref = x @ lin.weight.detach().T
    # GPTQ's objective: the layer output error of the quantized weight on the calibration inputs
    err = {n: ((x @ dequantize(m.packed()).T - ref).norm() / ref.norm()).item()
           for n, m in (("gptq", gptq), ("rtn", rtn), ("off", off))}
    assert err["off"] == err["rtn"]  # gptq=False ignores the Hessian
    assert err["gptq"] < 0.5 * err["rtn"], err
    # the whole W4A8 layer (INT8 activations too) is better as well
    full = {n: (m(x) - lin(x)).norm().item() for n, m in (("gptq", gptq), ("rtn", rtn))}
    assert full["gptq"] < full["rtn"], full


def test_empty_linear_rebuilds_the_layout():
    cfg = W4A8KV4Config(gptq=False)
    for k, bias in ((256, True), (576, False), (200, True)):  # g128, g64 (finer), per channel
        q = cfg.quantize_linear(_linear(k, 64, bias=bias), name="l")
        e = cfg.empty_linear(k, 64, bias, torch.float32, q.layer_meta())
        assert {n: (t.dtype, t.shape) for n, t in e.state_dict().items()} == \
               {n: (t.dtype, t.shape) for n, t in q.state_dict().items()}
        e.load_state_dict(q.state_dict())
        x = torch.randn(2, k)
        assert torch.equal(e(x), q(x))


def test_hf_quantization_config_is_self_describing():
    cfg = W4A8KV4Config()
    qc = cfg.hf_quantization_config({"model.layers.0.mlp.down_proj": {"group_size": 128},
                                     "model.layers.0.self_attn.q_proj": {"group_size": -1}})
    json.dumps(qc)
    assert qc["quant_method"] == "natix-w4a8kv4" and qc["version"] == 1
    assert qc["group_size"] == 128 and qc["kv_cache"] == "int4" and qc["ignore"] == ["lm_head"]
    assert qc["layers"]["model.layers.0.self_attn.q_proj"] == {"group_size": -1}
    assert qc["input_activations"]["strategy"] == "token" and qc["weights"]["num_bits"] == 4
    assert cfg.hf_quantization_config(None)["layers"] == {}
    assert W4A8KV4Config(kv_cache="none").hf_quantization_config()["kv_cache_scheme"] is None
    assert set(cfg.engines()) == {"natix hf", "natix kernels", "vllm"}


def test_hooks_with_transforms_off_are_noops(tiny):
    cfg = W4A8KV4Config(rotate=False, smooth_attention=False, smooth_outputs=False, rotate_values=False,
                        embed_bits=16, lm_head_bits=16)
    model = tiny.model("qwen2")  # tied embeddings
    report: dict = {}
    cfg.prepare_model(model, report)
    cfg.prepare_block("model.layers.0", model.model.layers[0], lambda: None, report)
    cfg.prepare_empty_model(model)
    assert report == {}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prepare_empty_model_unties(tiny):
    model = tiny.model("qwen2")
    W4A8KV4Config().prepare_empty_model(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False


def test_whole_tiny_model_quantized(tiny):
    """hidden 64 (K=64: g64, the "finer" fallback) and intermediate 128 (down_proj: g128)."""
    cfg = W4A8KV4Config(gptq=False, rotate=False, smooth_attention=False, smooth_outputs=False)
    model = tiny.model("llama")
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    metas = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not cfg.skips(name):
            q = cfg.quantize_linear(mod, name=name)
            metas[name] = q.layer_meta()
            model.set_submodule(name, q)
    assert metas["model.layers.0.mlp.down_proj"] == {"group_size": 128}
    assert metas["model.layers.1.self_attn.q_proj"] == {"group_size": 64}
    assert isinstance(model.lm_head, torch.nn.Linear) and len(metas) == 14
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.2, rel


@pytest.mark.parametrize("gptq", [False, True])
def test_weight_scale_mse_clips_groups_and_lowers_the_error(gptq):
    """weight_scale="mse": each group's level-1 range is the clipping ratio with the least squared
    error on its INT8 values: never worse than min-max per group (RTN), lower in total on heavy-tailed
    weights, same packed format; GPTQ takes the searched ranges as well."""
    from natix.kernels.packing import dequantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02)  # outliers in most groups
    x, H = _hessian(256)
    kw = dict(hessian=H) if gptq else {}
    plain = W4A8KV4Config(gptq=gptq).quantize_linear(lin, name="l", **kw)
    mse = W4A8KV4Config(gptq=gptq, weight_scale="mse").quantize_linear(lin, name="l", **kw)
    assert mse.layer_meta() == plain.layer_meta() == {"group_size": 128}
    assert not torch.equal(mse.group_scale, plain.group_scale)  # some groups were clipped
    w = lin.weight.detach()
    if not gptq:
        from natix.kernels.packing import integer_weight

        # the search's objective: the error on the level-0 INT8 values, group by group
        assert torch.equal(mse.scale, plain.scale)
        q8 = torch.round(w / plain.scale[:, None]).clamp(-119, 119)
        per_group = lambda m: (integer_weight(m.packed()).float() - q8).square().view(64, 2, 128).sum(-1)  # noqa: E731
        assert (per_group(mse) <= per_group(plain)).all()
        assert per_group(mse).sum() < 0.97 * per_group(plain).sum()
        assert (dequantize(mse.packed()) - w).norm() < (dequantize(plain.packed()) - w).norm()
    else:
        ref = x @ w.T
        out = lambda m: ((x @ dequantize(m.packed()).T - ref).norm() / ref.norm()).item()  # noqa: E731
        assert out(mse) < out(plain)
    assert W4A8KV4Config(weight_scale="mse").hf_quantization_config()["weight_scale"] == "mse"


def test_act_order_with_static_groups_packs_contiguous_groups():
    """act_order on progressive layers: columns solved by decreasing Hessian diagonal, groups fitted up
    front in the original order, so the packed format (no g_idx) holds the result exactly."""
    from natix.kernels.packing import dequantize

    lin = _linear(256, 64, seed=3)
    x, H = _hessian(256)
    H = H * torch.linspace(0.2, 3.0, 256, dtype=H.dtype)[None, :] ** 0.5 * torch.linspace(0.2, 3.0, 256, dtype=H.dtype)[:, None] ** 0.5
    plain = W4A8KV4Config(act_order=False).quantize_linear(lin, name="l", hessian=H)
    act = W4A8KV4Config().quantize_linear(lin, name="l", hessian=H)  # act_order=True by default
    assert act.layer_meta() == {"group_size": 128} and not torch.equal(act.qweight, plain.qweight)
    res = gptq_quantize(lin.weight.detach(), H, ProgressiveGrid(), group_size=128, act_order=True, static_groups=True)
    assert torch.equal(dequantize(act.packed()), res.dequantized)
    ref = x @ lin.weight.detach().T
    rel = lambda m: ((x @ dequantize(m.packed()).T - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(act) < 1.5 * rel(plain)  # a different GPTQ order, not a broken one


def test_group_sizes_mirror_the_kernels():
    """The torch-free config module keeps its own copy of the kernels' group sizes."""
    from natix.kernels.packing import GROUP_SIZES
    from natix.quant import w4a8kv4_config

    assert w4a8kv4_config.GROUP_SIZES == GROUP_SIZES


def test_config_module_import_is_light():
    code = ("import sys, natix.quant.w4a8kv4_config, natix.quant.schemes as s; s.known_schemes(); "
            "assert 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rotate_values", [False, True])
def test_qoq_hooks_preserve_the_function(tiny, rotate_values):
    """prepare_model (untie, fold norms, rotate) and prepare_block (SmoothAttention, output
    smoothing, value rotation) through natix.quant.qoq: the float model computes the same logits,
    the report says what was done, and W4A8 after the transforms stays close to the float model."""
    cfg = W4A8KV4Config(gptq=False, rotate_values=rotate_values)
    model = tiny.model("qwen2")  # tied embeddings: prepare_model must untie
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report: dict = {}
    cfg.prepare_model(model, report)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    for i, block in enumerate(model.model.layers):
        cfg.prepare_block(f"model.layers.{i}", block, lambda: model(ids), report)
    assert set(report) == {"qoq_prepare", "qoq_smooth"} | ({"qoq_value_rotation"} if rotate_values else set())
    assert set(report["qoq_smooth"]) == {"model.layers.0", "model.layers.1"}
    if rotate_values:
        assert report["qoq_value_rotation"]["model.layers.1"]["value_rotation"] == "hadamard"
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not cfg.skips(name):
            model.set_submodule(name, cfg.quantize_linear(mod, name=name))
    with torch.no_grad():
        q = model(ids).logits
    assert ((q - ref).norm() / ref.norm()).item() < 0.2


# ------------------------------------------------------------------------------ 8-bit embedding / lm_head


def test_vocab_bits_round_trip_and_old_manifests():
    """embed_bits / lm_head_bits: JSON round trip, recorded in hf_quantization_config; a full manifest
    written before the options existed reads both as 16 (its embedding and lm_head are bf16); a
    partial config takes the defaults (8)."""
    for e, h in ((16, 16), (8, 16), (16, 8), (8, 8)):
        cfg = W4A8KV4Config(embed_bits=e, lm_head_bits=h)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["embed_bits"] == e and d["lm_head_bits"] == h
        assert config_from_dict(d) == cfg
        qc = cfg.hf_quantization_config()
        assert qc["embed_bits"] == e and qc["lm_head_bits"] == h
    assert W4A8KV4Config().embed_bits == 16 and W4A8KV4Config().lm_head_bits == 16  # opt-in (reports/quant-accuracy.md)
    old = W4A8KV4Config().to_dict()
    del old["embed_bits"], old["lm_head_bits"], old["rotate_values"], old["rotate_keys"]
    back = config_from_dict(old)
    assert back.embed_bits == 16 and back.lm_head_bits == 16
    assert config_from_dict({"scheme": "w4a8kv4", "group_size": -1, "embed_bits": 8}).embed_bits == 8
    assert "not this artifact" not in W4A8KV4Config().engines()["vllm"]  # the default: vLLM's plugin serves it
    assert "not this artifact" in W4A8KV4Config(embed_bits=8).engines()["vllm"]


@pytest.mark.parametrize("bad,match", [
    ({"embed_bits": 5}, r"embed_bits must be one of 16, 8.*got 5"),
    ({"lm_head_bits": 4}, r"lm_head_bits must be one of 16, 8.*got 4"),
    ({"embed_bits": "8"}, r"embed_bits must be one of 16, 8.*got '8'"),
    ({"embed_bits": True}, "embed_bits"),
    ({"embed_bits": 8.0}, "embed_bits"),
    ({"ignore": [], "lm_head_bits": 8}, r"lm_head_bits=8.*ignore.*lm_head_bits=16"),
])
def test_vocab_bits_bad_values_name_the_option(bad, match):
    with pytest.raises(QuantError, match=match):
        config_from_dict({"scheme": "w4a8kv4", **bad})
    W4A8KV4Config(ignore=[], lm_head_bits=16)  # W4A8 lm_head as before: fine


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied, tied
def test_quantize_vocab_modules_compute_dequant_exactly(tiny, arch):
    """quantize_vocab: the embedding becomes int8 rows (per token) whose lookup is exactly the gather of
    dequant(E), lm_head a W8A16 linear that is exactly x.float() @ dequant(W).T; a tied pair is
    untied first; dtypes survive model.to(bf16); the empty modules the loader builds take the state
    dict and tensor_layout describes it."""
    from natix.kernels.w8a16_linear import dequantize_int8_rows, quantize_int8_rows
    from natix.quant.w8a16 import Int8Embedding, W8A16Linear

    cfg = W4A8KV4Config(gptq=False, embed_bits=8, lm_head_bits=8)
    model = tiny.model(arch)
    e0, h0 = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    report: dict = {}
    names = cfg.quantize_vocab(model, report)
    assert names == ["model.embed_tokens", "lm_head"] and report["vocab_int8"]["modules"] == names
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, W8A16Linear)
    assert model.config.tie_word_embeddings is False
    for mod, w in ((emb, e0), (head, h0)):
        q, s = quantize_int8_rows(w)
        assert torch.equal(mod.qweight, q) and torch.equal(mod.scale, s)
    ids = torch.tensor([[0, 5, 127, 5], [9, 3, 3, 1]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, dequantize_int8_rows(emb.qweight, emb.scale)))
    x = torch.randn(2, 3, 64)
    assert torch.equal(head(x), torch.nn.functional.linear(x, dequantize_int8_rows(head.qweight, head.scale)))
    assert ((head(x) - x @ h0.T).norm() / (x @ h0.T).norm()).item() < 0.02  # and 8 bits are close
    model.to(torch.bfloat16)
    assert emb.qweight.dtype == torch.int8 and emb.scale.dtype == torch.float32 and emb(ids).dtype == torch.bfloat16
    assert head.qweight.dtype == torch.int8 and head.scale.dtype == torch.float32
    xb = x.to(torch.bfloat16)
    assert torch.equal(head(xb), torch.nn.functional.linear(xb.float(), head.dequantized()).to(torch.bfloat16))
    assert torch.equal(emb(ids), dequantize_int8_rows(emb.qweight, emb.scale, torch.bfloat16)[ids])
    for name, mod in (("model.embed_tokens", emb), ("lm_head", head)):
        meta = mod.layer_meta()
        layout = cfg.tensor_layout(mod.out_features, mod.in_features, meta)
        dt = {torch.int8: "I8", torch.float32: "F32"}
        assert layout == {k: (dt[v.dtype], tuple(v.shape)) for k, v in mod.state_dict().items()}
        old = torch.nn.Embedding(128, 64) if name.startswith("model") else torch.nn.Linear(64, 128, bias=False)
        empty = cfg.empty_module(name, old, torch.bfloat16, meta)
        assert type(empty) is type(mod)
        empty.load_state_dict(mod.state_dict())
        args = (ids,) if name.startswith("model") else (xb,)
        assert torch.equal(empty(*args), mod(*args))


def test_vocab_bits_16_changes_nothing(tiny):
    cfg = W4A8KV4Config(embed_bits=16, lm_head_bits=16)
    model = tiny.model("qwen2")
    report: dict = {}
    assert cfg.quantize_vocab(model, report) == [] and report == {}
    assert type(model.model.embed_tokens) is torch.nn.Embedding and model.lm_head.weight is model.model.embed_tokens.weight
    only_head = W4A8KV4Config(lm_head_bits=8)
    assert only_head.quantize_vocab(model, report) == ["lm_head"]
    assert type(model.model.embed_tokens) is torch.nn.Embedding and model.config.tie_word_embeddings is False
