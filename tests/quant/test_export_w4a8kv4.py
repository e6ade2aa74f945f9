"""End to end: ``natix-quant export --scheme w4a8kv4`` on tiny models (CLI -> artifact -> inspect ->
reference loader -> hf engine), the ablation switches, and bad input."""

from __future__ import annotations


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


@pytest.mark.parametrize("group", ["128", "-1"])
def test_export_load_generate(wide_base, calib_file, tmp_path, tiny, hf_generate, group):
    from natix.quant.loader import describe_artifact, load_artifact
    from natix.quant.w4a8 import W4A8Linear

    out = tmp_path / "a"
    r = _export(wide_base, out, calib_file, "--group-size", group)
    assert r.exit_code == 0, r.output
    info = describe_artifact(out)
    assert info["scheme"] == "w4a8kv4" and info["quantized_layers"] == 14
    # 4-bit codes + per-channel fp32 scale (+ uint8 s1/sz per group of 128): ~4.3-4.4 bits incl. scales
    assert 4.0 < info["effective_bits_quantized"] < 4.6
    m = info["manifest"]["details"]
    assert m["calibration"]["samples"] == 8
    assert set(m["transforms"]["qoq_prepare"]) >= {"rotation", "folded_norms", "untied"}
    assert {v["group_size"] for v in m["layers"].values()} == {int(group)}
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
    """hidden 64: no layer's K divides by 128 -> per channel by default, a clear error on request."""
    out = tmp_path / "fb"
    r = _export(base_dirs["llama"], out, calib_file, "--set", "gptq=false")
    assert r.exit_code == 0, r.output
    assert "quantized per output channel" in r.output
    r = _export(base_dirs["llama"], tmp_path / "err", calib_file, "--set", "group_fallback=error")
    assert r.exit_code != 0
    assert "not a multiple of 128" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "err").exists()


@pytest.mark.parametrize("args, msg", [
    (["--scheme", "w4a9"], "unknown quantization scheme"),
    (["--scheme", "w4a8kv4", "--group-size", "64"], "group_size must be 128"),
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
