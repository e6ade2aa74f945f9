"""What natix's vLLM plugin reads from a w4a8kv4 artifact and what it refuses (main suite: no vLLM
needed; the same checks inside vLLM are in test_plugin.py, vllm job)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from natix.engines.vllm_plugin.artifact import ArtifactSpec, PluginRefused, check_artifact


@pytest.fixture(scope="module")
def artifact(tiny_llama_builder, tmp_path_factory) -> Path:
    from natix.quant.export import export
    from natix.quant.w4a8kv4_config import W4A8KV4Config

    root = tmp_path_factory.mktemp("plugin-artifact")
    base = tiny_llama_builder(root / "base", hidden=128, max_positions=256)
    # 16-bit embedding and lm_head: what the plugin serves (the 8-bit default is refused, below)
    return export(str(base), W4A8KV4Config(gptq=False, embed_bits=16, lm_head_bits=16), root / "w4a8kv4", dtype="fp32", calib="pydoc",
                  calib_samples=4, calib_max_length=64).out


@pytest.fixture(scope="module")
def qc(artifact) -> dict:
    return json.loads((artifact / "config.json").read_text())["quantization_config"]


def test_reads_a_natix_export(artifact, qc):
    spec = check_artifact(artifact)
    assert spec is not None and spec == ArtifactSpec.from_quantization_config(qc)
    assert spec.kv_cache == "int4" and spec.ignore == ("lm_head",) and len(spec.layers) == 14
    q = spec.layers["model.layers.0.self_attn.q_proj"]
    assert (q.group_size, q.shape) == (128, (128, 128))
    prefix = "model.layers.1.self_attn.qkv_proj"
    parts = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert spec.group_size_of(prefix, parts) == 128
    assert spec.fused_shape(prefix, parts) == (128 + 64 + 64, 128)
    assert spec.group_size_of("lm_head", ["lm_head"]) is None  # kept in float
    assert spec.renamed(lambda n: n.replace("model.", "decoder.")).layers["decoder.layers.0.mlp.down_proj"]


def test_other_models_are_not_its_business(tiny_model_dir, tmp_path):
    assert check_artifact(tiny_model_dir) is None  # a plain HF directory
    assert check_artifact(tmp_path) is None  # no config.json: vLLM says so itself
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    assert check_artifact(tmp_path) is None  # natix's fp8 / gptq artifacts: vLLM's own loader


CONFIG_CASES = {
    "another natix scheme": (lambda q: q.update(quant_method="natix-w8a8"),
                             "quant_method 'natix-w8a8' is not a scheme this plugin serves"),
    "newer format": (lambda q: q.update(version=2), "has format version 2, but this natix"),
    "version true": (lambda q: q.update(version=True), "has format version True"),
    "no layers": (lambda q: q.pop("layers"), "quantization_config.layers must map"),
    "8-bit embedding": (lambda q: q.update(embed_bits=8), "(embed_bits=8, lm_head_bits=16); the plugin serves "
                                                         "16-bit ones only. Re-export with `--set embed_bits=16"),
    "8-bit lm_head": (lambda q: q.update(lm_head_bits=8), "lm_head_bits=8"),
    "group size 16": (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(group_size=16),
                      "layer model.layers.0.mlp.up_proj: group_size must be one of 32, 64, 128 or -1, got 16"),
    "g64 over K=96": (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(group_size=64, shape=[256, 96]),
                      "g64 needs in_features % 64 == 0, got 96"),
    "no shape": (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].pop("shape"),
                 "layer model.layers.0.mlp.up_proj: shape must be [out_features, in_features], got None"),
    "odd N": (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(shape=[255, 128]),
              "out_features 255 is odd"),
    "g128 over K=96": (lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(shape=[256, 96]),
                       "g128 needs in_features % 128 == 0, got 96"),
    "unknown kv cache": (lambda q: q.update(kv_cache="int2"), "kv_cache must be one of int4, none, got 'int2'"),
    "ignore not a list": (lambda q: q.update(ignore="lm_head"), "ignore must be a list of names"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_refuses_a_quantization_config_it_cannot_serve(case, qc):
    edit, message = CONFIG_CASES[case]
    bad = copy.deepcopy(qc)
    edit(bad)
    with pytest.raises(PluginRefused, match="^natix vLLM plugin: ") as info:
        ArtifactSpec.from_quantization_config(bad)
    assert message in str(info.value)


def test_a_fused_layer_must_be_quantized_alike(qc):
    q = copy.deepcopy(qc)
    del q["layers"]["model.layers.0.self_attn.v_proj"]
    spec = ArtifactSpec.from_quantization_config(q)
    parts = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    with pytest.raises(PluginRefused, match="quantized only some of them .*v_proj not"):
        spec.group_size_of("model.layers.0.self_attn.qkv_proj", parts)
    q = copy.deepcopy(qc)
    q["layers"]["model.layers.0.self_attn.k_proj"]["group_size"] = -1
    with pytest.raises(PluginRefused, match=r"group sizes differ \(\[-1, 128\]\)"):
        ArtifactSpec.from_quantization_config(q).group_size_of("model.layers.0.self_attn.qkv_proj", parts)


def _edit(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


DIRECTORY_CASES = {
    "manifest of another version": (
        lambda d: _edit(d / "natix_manifest.json", lambda m: m["details"]["quant_config"].update(version=9)),
        "W4A8KV4Config version 9 is not supported"),
    "manifest of another scheme": (
        lambda d: _edit(d / "natix_manifest.json", lambda m: m["details"].update(quant_config={"scheme": "fp8"})),
        "its natix manifest says scheme 'fp8'"),
    "no manifest": (lambda d: (d / "natix_manifest.json").unlink(), "is not a natix artifact: no natix_manifest.json"),
    "truncated checkpoint": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
        "model.safetensors is not a readable safetensors file"),
    "config and manifest disagree": (
        lambda d: _edit(d / "config.json", lambda c: c["quantization_config"]["layers"][
            "model.layers.1.mlp.down_proj"].update(group_size=-1)),
        "config.json's quantization_config.layers and natix_manifest.json's details.layers disagree"),
}


@pytest.mark.parametrize("case", list(DIRECTORY_CASES))
def test_refuses_a_directory_that_does_not_match(case, artifact, tmp_path):
    edit, message = DIRECTORY_CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    edit(bad)
    with pytest.raises(PluginRefused, match="^natix vLLM plugin: ") as info:
        check_artifact(bad)
    assert message in str(info.value)
