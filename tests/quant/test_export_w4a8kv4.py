"""End to end: ``natix-quant export --scheme w4a8kv4`` on tiny models (CLI -> artifact -> inspect ->
reference loader -> hf engine), the ablation switches, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from natix.quant.cli import main


def _export(base, out, calib, *extra):
    r = CliRunner().invoke(main, ["export", "--base", str(base), "--scheme", "w4a8kv4", "--calib", str(calib),
                                  "--out", str(out), "--dtype", "fp32", *extra])
    return r


def _logits(model, ids):
    from natix.engines.kv_cache import cache_argument
    from natix.quant.kv_quant import new_cache

    with torch.no_grad():
        cache = new_cache(model)
        kw = {cache_argument(model): cache, "use_cache": True} if cache is not None else {}
        return model(torch.tensor([ids]), **kw).logits.float()


@pytest.mark.parametrize("group", ["128", "64", "-1"])
def test_export_load_generate(wide_base, calib_file, tmp_path, tiny, hf_generate, group):
    from natix.quant.loader import describe_artifact, load_artifact
    from natix.quant.w4a8 import W4A8Linear

    out = tmp_path / "a"
    # the 8-bit vocabulary tables (opt-in) ride along: the 16-bit default is the 14-layer case of
    # test_vocab_bits_export_and_load below
    r = _export(wide_base, out, calib_file, "--group-size", group, "--set", "embed_bits=8", "--set", "lm_head_bits=8")
    assert r.exit_code == 0, r.output
    info = describe_artifact(out)
    # 14 W4A8 linears, and the int8 embedding and lm_head
    assert info["scheme"] == "w4a8kv4" and info["quantized_layers"] == 16
    assert info["unquantized_bytes"] < 4096  # norms only: nothing of the vocabulary is left in float
    m = info["manifest"]["details"]
    w4 = [n for n in m["layers"] if n not in ("model.embed_tokens", "lm_head")]
    assert len(w4) == 14
    # 4-bit codes + fp32 scales (+ uint8 s1/sz per group of 128) for the linears, int8 + fp32 row scales for
    # the [128, 128] embedding and lm_head: between 4 and 8 bits a weight incl. scales
    assert 4.5 < info["effective_bits_quantized"] < 6
    assert m["calibration"]["samples"] == 8
    assert set(m["transforms"]["qoq_prepare"]) >= {"rotation", "folded_norms", "untied"}
    assert {m["layers"][n]["group_size"] for n in w4} == {int(group)}
    assert m["layers"]["lm_head"] == {"format": "w8a16", "bits": 8, "shape": [128, 128]}
    assert m["layers"]["model.embed_tokens"] == {"format": "int8_embedding", "bits": 8, "shape": [128, 128]}
    model, _ = load_artifact(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, W4A8Linear) and model.natix_kv_cache == "int4"
    # quantized logits stay close to the float model's (4-bit weights, 8-bit activations, 4-bit KV)
    ref = tiny.model("llama", hidden=128)
    ids = list(range(4, 36))
    err = ((_logits(model, ids) - _logits(ref, ids)).norm() / _logits(ref, ids).norm()).item()
    assert err < 0.35, err
    assert hf_generate(out).num_tokens >= 1


def test_gptq_and_transforms_reduce_error(wide_base, calib_file, tmp_path, tiny):
    """On the calibration text itself, the full recipe beats plain RTN without transforms."""
    from natix.quant.loader import load_artifact

    ids = [4 + (j * 7) % 120 for j in range(32)]  # calibration row 0
    ref = _logits(tiny.model("llama", hidden=128), ids)
    errs = {}
    for name, extra in {"full": [], "rtn-plain": ["--set", "gptq=false", "--set", "rotate=false", "--set",
                                                  "smooth_attention=false", "--set", "smooth_outputs=false"]}.items():
        out = tmp_path / name
        assert _export(wide_base, out, calib_file, "--kv", "none", *extra).exit_code == 0
        model, _ = load_artifact(out)
        errs[name] = ((_logits(model, ids) - ref).norm() / ref.norm()).item()
    assert errs["full"] < errs["rtn-plain"], errs


def test_group_fallback_and_error(base_dirs, calib_file, tmp_path):
    """hidden 64: q/k/v/o/gate/up's K does not divide by 128 -> g64 by default ("finer"), per
    channel on request, a clear error on request."""
    r = _export(base_dirs["llama"], tmp_path / "fb", calib_file, "--set", "gptq=false")
    assert r.exit_code == 0, r.output
    assert "quantized in groups of 64 (group_fallback='finer'" in " ".join(r.output.split()), r.output
    layers = json.loads((tmp_path / "fb" / "natix_manifest.json").read_text())["details"]["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["group_size"] == 64
    assert layers["model.layers.0.mlp.down_proj"]["group_size"] == 128
    r = _export(base_dirs["llama"], tmp_path / "ch", calib_file, "--set", "gptq=false", "--set", "group_fallback=channel")
    assert r.exit_code == 0, r.output
    assert "quantized per output channel" in r.output
    r = _export(base_dirs["llama"], tmp_path / "err", calib_file, "--set", "group_fallback=error")
    assert r.exit_code != 0
    assert "not a multiple of 128" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "err").exists()


@pytest.mark.parametrize("args, msg", [
    (["--scheme", "w4a9"], "unknown quantization scheme"),
    (["--scheme", "w4a8kv4", "--group-size", "16"], "group_size must be one of 32, 64, 128"),
    (["--scheme", "w4a8kv4", "--kv", "fp8"], "kv_cache must be 'int4' or 'none'"),
    (["--scheme", "fp8", "--group-size", "128"], "does not take --group-size"),
    (["--scheme", "w4a8kv4", "--set", "rotat=false"], "does not take rotat"),
    (["--scheme", "w4a8kv4", "--calib", "nope.jsonl"], "does not exist"),
    (["--scheme", "w4a8kv4", "--calib", "EMPTY"], "is empty"),
    (["--scheme", "w4a8kv4", "--calib-samples", "0"], "0 is not in the range x>=1"),
])
def test_bad_input_writes_nothing(base_dirs, tmp_path, args, msg):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--out", str(out), *args])
    assert r.exit_code != 0
    assert msg in " ".join(r.output.split()), r.output
    assert not out.exists() and not list(tmp_path.glob(".natix-tmp-*"))


def test_out_exists_needs_force(base_dirs, calib_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _export(base_dirs["llama"], out, calib_file, "--set", "gptq=false")
    assert r.exit_code != 0 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("bits", [(16, 16), (8, 16), (16, 8)])
def test_vocab_bits_export_and_load(wide_base, calib_file, tmp_path, hf_generate, bits):
    """--set embed_bits / lm_head_bits: what is written (int8 + float32 scales, or the model dtype), the
    manifest and config.json record it, inspect verifies it, and the loader rebuilds modules that
    compute exactly dequant(weight); a 16-bit one stays the plain module."""
    import json

    from safetensors import safe_open

    from natix.kernels.w8a16_linear import dequantize_int8_rows
    from natix.quant.loader import describe_artifact, load_artifact
    from natix.quant.w8a16 import Int8Embedding, W8A16Linear

    e, h = bits
    out = tmp_path / "a"
    r = _export(wide_base, out, calib_file, "--set", "gptq=false", "--set", f"embed_bits={e}",
                "--set", f"lm_head_bits={h}")
    assert r.exit_code == 0, r.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    for name, b in (("model.embed_tokens", e), ("lm_head", h)):
        if b == 8:
            assert dtypes[f"{name}.qweight"] == "I8" and dtypes[f"{name}.scale"] == "F32"
            assert f"{name}.weight" not in keys
        else:
            assert dtypes[f"{name}.weight"] == "F32" and f"{name}.qweight" not in keys
    manifest = json.loads((out / "natix_manifest.json").read_text())["details"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert manifest["quant_config"]["embed_bits"] == qc["embed_bits"] == e
    assert manifest["quant_config"]["lm_head_bits"] == qc["lm_head_bits"] == h
    assert ("model.embed_tokens" in manifest["layers"]) == (e == 8) and ("lm_head" in manifest["layers"]) == (h == 8)
    info = describe_artifact(out)
    assert info["quantized_layers"] == 14 + (e == 8) + (h == 8)
    model, _ = load_artifact(out)
    emb, head = model.model.embed_tokens, model.lm_head
    assert type(emb) is (Int8Embedding if e == 8 else torch.nn.Embedding)
    assert type(head) is (W8A16Linear if h == 8 else torch.nn.Linear)
    ids = torch.tensor([[4, 9, 100, 4]])
    x = torch.randn(3, 128)
    if e == 8:
        assert torch.equal(emb(ids), dequantize_int8_rows(emb.qweight, emb.scale)[ids])
    if h == 8:
        assert torch.equal(head(x), torch.nn.functional.linear(x, dequantize_int8_rows(head.qweight, head.scale)))
    assert hf_generate(out).num_tokens >= 1


def test_artifact_without_vocab_fields_loads_16_bit(wide_base, calib_file, tmp_path):
    """An artifact written before embed_bits / lm_head_bits (its manifest lacks them; bf16 tensors) loads
    as before: plain embedding and lm_head."""
    import json

    from natix.quant.loader import load_artifact

    out = tmp_path / "old"
    assert _export(wide_base, out, calib_file, "--set", "gptq=false", "--set", "embed_bits=16", "--set",
                   "lm_head_bits=16").exit_code == 0
    for f, path in (("natix_manifest.json", ("details", "quant_config")), ("config.json", ("quantization_config",))):
        d = json.loads((out / f).read_text())
        node = d
        for k in path:
            node = node[k]
        del node["embed_bits"], node["lm_head_bits"]
        (out / f).write_text(json.dumps(d))
    model, _ = load_artifact(out)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
