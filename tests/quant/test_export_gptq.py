"""End to end: ``natix-quant export --scheme gptq`` (CLI -> compressed-tensors pack-quantized artifact ->
inspect -> reference loader -> hf engine), group fallback and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from natix.quant.cli import main


def _export(base, out, calib, *extra):
    return CliRunner().invoke(main, ["export", "--base", str(base), "--scheme", "gptq", "--calib", str(calib),
                                     "--out", str(out), "--dtype", "fp32", *extra])


@pytest.mark.parametrize("extra, groups", [([], {128}), (["--group-size", "-1"], {-1}),
                                           (["--act-order", "weight", "--kv", "fp8"], {128})])
def test_export_inspect_load_generate(wide_base, calib_file, tmp_path, tiny, hf_generate, extra, groups):
    from natix.quant.loader import describe_artifact, load_artifact
    from natix.quant.w4a16 import W4A16Linear

    out = tmp_path / "g"
    r = _export(wide_base, out, calib_file, *extra)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    info = describe_artifact(out)
    assert info["scheme"] == "gptq" and info["quantized_layers"] == 14
    assert 4.0 < info["effective_bits_quantized"] < 4.7
    layers = info["manifest"]["details"]["layers"]
    assert {m["group_size"] for m in layers.values()} == groups
    model, _ = load_artifact(out)
    assert isinstance(model.model.layers[1].mlp.down_proj, W4A16Linear)
    assert model.natix_kv_cache == ("fp8" if "--kv" in extra else "none")
    ref = tiny.model("llama", hidden=128)
    ids = torch.tensor([list(range(4, 36))])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 0.2
    assert hf_generate(out).num_tokens >= 1


def test_fallback_is_announced_and_error_mode_refuses(base_dirs, calib_file, tmp_path):
    r = _export(base_dirs["llama"], tmp_path / "fb", calib_file)  # hidden 64: no K divides by 128
    assert r.exit_code == 0, r.output
    assert "quantized per output channel" in " ".join(r.output.split())
    r = _export(base_dirs["llama"], tmp_path / "fine", calib_file, "--set", "group_fallback=finer")
    assert r.exit_code == 0, r.output
    assert "quantized in groups of 64 (group_fallback='finer'" in " ".join(r.output.split())
    r = _export(base_dirs["llama"], tmp_path / "err", calib_file, "--set", "group_fallback=error")
    assert r.exit_code != 0 and "group_size" in r.output
    assert not (tmp_path / "err").exists()


def test_gptq_rejects_int4_kv_and_bad_group(base_dirs, tmp_path):
    for extra, msg in ((["--kv", "int4"], "kv_cache"), (["--group-size", "0"], "group_size")):
        r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--scheme", "gptq",
                                      "--out", str(tmp_path / "x"), *extra])
        assert r.exit_code != 0 and msg in r.output, r.output
        assert not (tmp_path / "x").exists()


def test_adapter_for_another_base_is_refused(base_dirs, make_adapter, calib_file, tmp_path):
    adapter = make_adapter("llama", "lora", hidden=48)  # made on a llama of another width
    r = CliRunner().invoke(main, ["export", "--base", str(base_dirs["llama"]), "--adapter", str(adapter),
                                  "--scheme", "gptq", "--calib", str(calib_file), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "adapter" in r.output.lower()
    assert not (tmp_path / "x").exists()
