"""FP8 export: e4m3 math, the reference Fp8Linear, the compressed-tensors artifact, the loader,
the hf engine on the artifact, the CLI (errors, atomicity, inspect).

Measured on the tiny random models (2 layers, hidden 64, fp32): weight quant/dequant RMS relative
error ~2.4%; Fp8Linear vs fp32 linear ~3.5%; artifact logits vs the fp32 model 3.7% (llama) /
3.0% (qwen2) — tolerance 6%; transformers + compressed-tensors reading the same artifact gives
logits identical (0.0) to our reference loader.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from natix.quant.cli import main

LOGIT_TOL = 0.06


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def artifacts(base_dirs, tmp_path_factory):
    """fp8 artifacts (fp32 unquantized tensors) of the tiny llama (untied) and qwen2 (tied)."""
    from natix.quant.export import export
    from natix.quant.fp8_config import Fp8Config

    root = tmp_path_factory.mktemp("fp8")
    return {arch: export(str(base_dirs[arch]), Fp8Config(), root / arch, dtype="fp32").out for arch in base_dirs}


# ------------------------------------------------------------------ math
def test_weight_quant_dequant_error_bounds():
    from natix.quant.fp8 import FP8_DTYPE, dequantize, quantize_weight_per_channel

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * torch.rand(256, 1, generator=g) * 3
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (256, 1)
    d = dequantize(q, s)
    assert rel(d, w) < 0.03  # measured ~0.024
    # per element: one e4m3 rounding is within 2^-4 relative for normal values
    normal = (w / s).abs() >= 2.0 ** -6
    assert ((d - w).abs()[normal] <= (w.abs() * 2.0 ** -4 + 1e-12)[normal]).all()
    assert torch.allclose((q.float().abs().amax(dim=1)), torch.full((256,), 448.0))  # full range used


def test_zero_rows_and_tokens_are_safe():
    from natix.quant.fp8 import fp8_linear, quantize_weight_per_channel

    w = torch.randn(8, 16)
    w[3] = 0
    q, s = quantize_weight_per_channel(w)
    x = torch.randn(4, 16)
    x[1] = 0
    y = fp8_linear(x, q, s)
    assert torch.isfinite(y).all() and (y[1] == 0).all() and (y[:, 3] == 0).all()


def test_fp8_linear_vs_fp32_linear():
    from natix.quant.fp8 import Fp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    qlin = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 7, 256)
    err = rel(qlin(x), lin(x))
    assert 1e-3 < err < 0.05  # measured ~0.035: both weight and activation are rounded
    # dtype casts never touch the fp8 storage or the fp32 scales
    qlin.to(torch.bfloat16)
    assert qlin.weight.dtype == torch.float8_e4m3fn and qlin.weight_scale.dtype == torch.float32
    assert qlin.bias.dtype == torch.bfloat16
    assert qlin(x.bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------ config + registry
def test_config_round_trip_and_registry():
    from natix.quant.errors import QuantError
    from natix.quant.fp8_config import Fp8Config
    from natix.quant.schemes import UnknownSchemeError, config_from_dict, known_schemes, scheme_class

    cfg = Fp8Config(ignore=("lm_head", "mlp.down_proj"))
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert scheme_class("fp8") is Fp8Config and "fp8" in known_schemes()
    with pytest.raises(UnknownSchemeError, match="known schemes: .*fp8"):
        scheme_class("int3")
    with pytest.raises(QuantError, match="version"):
        Fp8Config.from_dict({**cfg.to_dict(), "version": 99})
    with pytest.raises(QuantError, match="channel"):
        Fp8Config(weight_strategy="tensor")
    with pytest.raises(AttributeError):
        cfg.ignore = ()  # frozen


# ------------------------------------------------------------------ artifact
def test_config_json_has_what_vllm_reads(artifacts):
    qc = json.loads((artifacts["llama"] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == (8, "float", "channel", True, False)
    assert (a["num_bits"], a["type"], a["strategy"], a["symmetric"], a["dynamic"]) == (8, "float", "token", True, True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_safetensors_dtypes(artifacts, arch, tiny):
    from safetensors import safe_open

    with safe_open(str(artifacts[arch] / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for layer in range(2):
            for mod in tiny.linear:
                parent = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                name = f"model.layers.{layer}.{parent}.{mod}"
                assert f.get_slice(f"{name}.weight").get_dtype() == "F8_E4M3"
                assert f.get_slice(f"{name}.weight_scale").get_dtype() == "F32"
                assert f.get_slice(f"{name}.weight_scale").get_shape() == [f.get_slice(f"{name}.weight").get_shape()[0], 1]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert ("lm_head.weight" in keys) == (arch == "llama")  # qwen2 ties it to the embeddings
        assert not any(k.startswith("lm_head") and k.endswith("scale") for k in keys)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_artifact_round_trip(artifacts, arch, tiny):
    from natix.quant.fp8 import Fp8Linear
    from natix.quant.loader import load_artifact
    from natix.quant.models import load_base

    ref = tiny.model(arch)
    model, tok = load_artifact(artifacts[arch])
    assert isinstance(model.model.layers[1].mlp.down_proj, Fp8Linear)
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel(model(ids).logits, ref(ids).logits)
        assert 1e-3 < err < LOGIT_TOL, err  # measured 0.037 llama, 0.030 qwen2
        # load_base routes quantized artifacts through the same loader (the hf engine's path)
        again, _ = load_base(str(artifacts[arch]))
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert tok.pad_token is not None


def test_transformers_compressed_tensors_reads_the_same_thing(artifacts):
    """An independent reader of the format (transformers + compressed-tensors) agrees exactly."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from natix.quant.loader import load_artifact

    theirs = AutoModelForCausalLM.from_pretrained(artifacts["llama"])
    ours, _ = load_artifact(artifacts["llama"])
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(theirs(ids).logits, ours(ids).logits) < 1e-5  # measured 0.0


def test_manifest(artifacts, base_dirs):
    from natix.quant.artifact import read_manifest
    from natix.quant.models import tree_sha256

    m = read_manifest(artifacts["llama"])
    assert m.scheme == "fp8" and m.dtype == "fp32" and m.adapter is None
    assert m.base.sha256 == tree_sha256(base_dirs["llama"])
    assert m.details["quant_config"]["scheme"] == "fp8" and m.details["quantized_modules"] == 14
    assert m.details["skipped_modules"] == ["lm_head"]


def test_hf_engine_generates_from_artifact(artifacts):
    from natix.engines.base import EngineConfig, SamplingSpec, create_engine
    from natix.quant.fp8 import Fp8Linear

    eng = create_engine("hf")
    eng.load(EngineConfig(model=str(artifacts["llama"]), device="cpu"))
    try:
        assert isinstance(eng.model.model.layers[0].self_attn.q_proj, Fp8Linear)
        (res,) = eng.generate(["w5 w6 w7"], SamplingSpec(max_tokens=6))
        assert 1 <= res[0].num_tokens <= 6 and all(lp <= 0 for lp in res[0].token_logprobs)
    finally:
        eng.close()


# ------------------------------------------------------------------ CLI
def test_cli_export_with_adapter_and_inspect(base_dirs, make_adapter, tmp_path):
    adapter = make_adapter("llama", "lora")
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--adapter", str(adapter),
                                  "--scheme", "fp8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    from natix.quant.artifact import read_manifest

    m = read_manifest(out)
    assert m.adapter.type == "LORA" and m.dtype == "bf16" and m.details["merge"]["parity_error"] < 1e-4
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for needle in ("fp8", "bits per weight", "vllm", "sglang", "natix hf", "model.safetensors",
                   "natix_manifest.json", "F8_E4M3: 14", "LORA"):
        assert needle in r.output, needle
    info = json.loads(CliRunner().invoke(main, ["inspect", "--json", str(out)]).output)
    assert info["bits_per_weight"] == 8 and 8 < info["effective_bits_quantized"] < 8.6
    # refuses to overwrite; --force replaces
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--scheme", "fp8", "--out", str(out)])
    assert r.exit_code != 0 and "already exists" in r.output
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--scheme", "fp8", "--out", str(out),
                                  "--force"])
    assert r.exit_code == 0, r.output
    assert read_manifest(out).adapter is None


def _one_line_error(r) -> str:
    assert r.exit_code != 0
    # progress lines ("[m:ss] checking inputs", off a terminal) may come before the error
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not re.match(r"\[\d+:\d{2}(?::\d{2})?\] ", ln)]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("case", ["scheme", "base", "adapter", "corrupt_base"])
def test_cli_errors_write_nothing(case, base_dirs, tmp_path):
    base, adapter, scheme = str(base_dirs["llama"]), None, "fp8"
    if case == "scheme":
        scheme = "int3"
    elif case == "base":
        base = str(tmp_path / "nope")
    elif case == "adapter":
        adapter = tmp_path / "bad-adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{not json")
    else:
        bad = tmp_path / "badbase"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
        (bad / "model.safetensors").write_bytes(b"garbage")
        base = str(bad)
    out = tmp_path / "out"
    args = ["export", "--base", base, "--scheme", scheme, "--out", str(out)] + (["--adapter", str(adapter)] if adapter else [])
    line = _one_line_error(CliRunner().invoke(main, args))
    expected = {"scheme": "known schemes: fp8", "base": "not found", "adapter": "adapter_config.json",
                "corrupt_base": "cannot load"}[case]
    assert expected in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".natix-")]


def test_failure_mid_write_leaves_nothing(base_dirs, tmp_path, monkeypatch):
    import natix.quant.artifact as artifact_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact_mod, "write_manifest", boom)  # after weights + config are written
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        from natix.quant.export import export
        from natix.quant.fp8_config import Fp8Config

        export(str(base_dirs["llama"]), Fp8Config(), out)
    assert list(tmp_path.iterdir()) == []


def test_inspect_not_an_artifact(base_dirs, tmp_path):
    assert "no natix_manifest.json" in _one_line_error(CliRunner().invoke(main, ["inspect", str(base_dirs["llama"])]))
    assert "not a directory" in _one_line_error(CliRunner().invoke(main, ["inspect", str(tmp_path / "x")]))


@pytest.mark.slow
def test_smollm2_fp8_export(tmp_path):
    pytest.importorskip("gguf")
    from natix.quant.export import export
    from natix.quant.fp8_config import Fp8Config
    from natix.quant.loader import load_artifact
    from natix.quant.models import ModelLoadError, load_base

    try:
        ref, tok = load_base("smollm2-135m", dtype="fp32")
    except ModelLoadError as e:
        pytest.skip(str(e))
    export("smollm2-135m", Fp8Config(), tmp_path / "a", dtype="bf16")
    model, _ = load_artifact(tmp_path / "a")
    ids = tok(["<|im_start|>user\nWhat is 12 + 5?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    err, top1 = rel(a, b), (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # measured on this prompt: rel 0.098, top-1 agreement 0.89 (plain bf16 alone gives ~0.06:
    # SmolLM2's activation outliers make per-token fp8 much noisier than on random weights)
    assert err < 0.2 and top1 >= 0.75, (err, top1)


# ------------------------------------------------------------------ fp8 KV cache
def test_fp8_kv_cache_export_load_and_generate(base_dirs, tmp_path, hf_generate):
    """--kv fp8: calibrated per-layer scales land in the checkpoint under the names vLLM reads,
    the config carries compressed-tensors' kv_cache_scheme, and the reference path uses them."""
    from safetensors import safe_open

    from natix.quant.loader import load_artifact

    calib = tmp_path / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"text": " ".join(f"w{4 + (i * 7 + j) % 100}" for j in range(24))})
                               for i in range(6)) + "\n")
    out = tmp_path / "fp8kv"
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--scheme", "fp8", "--kv", "fp8",
                                  "--calib", str(calib), "--out", str(out), "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["num_bits"] == 8 and qc["kv_cache_scheme"]["type"] == "float"
    assert qc["kv_cache_scheme"]["strategy"] == "tensor" and qc["kv_cache_scheme"]["dynamic"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}
    assert sorted(scales) == sorted(f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("k_scale", "v_scale"))
    assert all(t.dtype == torch.float32 and t.numel() == 1 and float(t) > 0 for t in scales.values())
    manifest = json.loads((out / "natix_manifest.json").read_text())
    assert manifest["details"]["calibration"]["samples"] == 6
    assert set(manifest["details"]["transforms"]["kv_scales"]) == {"model.layers.0", "model.layers.1"}

    model, _ = load_artifact(out)
    assert model.natix_kv_cache == "fp8"
    assert float(model.model.layers[1].self_attn.v_scale) == float(scales["model.layers.1.self_attn.v_scale"])
    assert hf_generate(out).num_tokens >= 1


def test_fp8_rejects_int4_kv(base_dirs, tmp_path):
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--scheme", "fp8", "--kv", "int4",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "kv_cache must be 'none' or 'fp8'" in r.output
    assert not (tmp_path / "x").exists()


def test_sharded_checkpoint_round_trip(base_dirs, tmp_path, monkeypatch):
    """Shards + index in Hugging Face's layout; the loader and inspect read them."""
    import natix.quant.export as ex
    from natix.quant.fp8_config import Fp8Config
    from natix.quant.loader import describe_artifact, load_artifact

    one = ex.export(str(base_dirs["llama"]), Fp8Config(), tmp_path / "one", dtype="fp32").out
    monkeypatch.setattr(ex, "MAX_SHARD_BYTES", 40_000)
    many = ex.export(str(base_dirs["llama"]), Fp8Config(), tmp_path / "many", dtype="fp32").out
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / ex.INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    a, _ = load_artifact(one)
    b, _ = load_artifact(many)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert describe_artifact(many)["effective_bits_quantized"] == describe_artifact(one)["effective_bits_quantized"]
