"""``natix-quant export --device``: calibrated schemes quantize each decoder layer on the device (the
model stays on the CPU). CPU: the flag's errors. CUDA (skipped without it): the same artifact as on
the CPU, to the arithmetic's precision."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from natix.quant.cli import main

CUDA = torch.cuda.is_available()


def _export(base, out, calib, scheme, *extra):
    return CliRunner().invoke(main, ["export", "--base", str(base), "--scheme", scheme, "--calib", str(calib),
                                     "--out", str(out), "--dtype", "fp32", *extra])


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error_and_writes_nothing(wide_base, calib_file, tmp_path):
    out = tmp_path / "a"
    r = _export(wide_base, out, calib_file, "gptq", "--device", "cuda")
    assert r.exit_code != 0 and "--device cuda: no CUDA device" in r.output
    assert not out.exists()
    r = _export(wide_base, out, calib_file, "gptq", "--device", "gpu0")
    assert r.exit_code != 0 and "not a device" in r.output and not out.exists()


def test_cpu_device_is_recorded(wide_base, calib_file, tmp_path):
    out = tmp_path / "a"
    r = _export(wide_base, out, calib_file, "gptq", "--device", "cpu")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "natix_manifest.json").read_text())
    assert manifest["details"]["calibration"]["device"] == "cpu"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["gptq", "w4a8kv4"])
def test_cuda_export_matches_cpu(wide_base, calib_file, tmp_path, scheme):
    from safetensors.torch import load_file

    dirs = {}
    for dev in ("cpu", "cuda"):
        dirs[dev] = tmp_path / dev
        r = _export(wide_base, dirs[dev], calib_file, scheme, "--device", dev)
        assert r.exit_code == 0, r.output
    a, b = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in dirs.values())
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.is_floating_point():
            assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-5), k
        else:  # integer codes: GPTQ's fp64 solves on two devices may flip a rare rounding tie
            frac = (x != y).float().mean().item()
            assert frac < 1e-3, (k, frac)
    assert json.loads((dirs["cuda"] / "natix_manifest.json").read_text())["details"]["calibration"]["device"] == "cuda"
