"""FP8 linear through torch._scaled_mm, and the kernel-selection layer."""
import pytest
import torch

from natix.kernels import packing
from natix.kernels.fp8_linear import fp8_linear, fp8_linear_reference, quantize_fp8_weight
from natix.kernels.select import LinearSpec, can_implement, make_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))




def test_fp8_linear():
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(32, 64, device=DEVICE)
    fw = quantize_fp8_weight(w)
    bias = torch.randn(32, device=DEVICE, dtype=torch.bfloat16)
    out = fp8_linear(x, fw, bias)
    assert out.shape == (5, 32) and out.dtype == torch.bfloat16
    assert rel_err(out, fp8_linear_reference(x, fw, bias)) < 1e-2
    assert rel_err(out, x.float() @ w.t() + bias.float()) < 0.1


def test_can_implement_reasons():
    ok, why = can_implement(LinearSpec("w4a8_g128", 64, 200, DEVICE))
    assert not ok and "group" in why
    ok, why = can_implement(LinearSpec("w4a8_channel", 63, 256, DEVICE))
    assert not ok and "odd" in why
    ok, why = can_implement(LinearSpec("fp8", 64, 256, "cpu"))
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("scheme", ["w4a8_g128", "w4a8_channel", "fp8"])
def test_make_linear(scheme):
    w = torch.randn(64, 256, device=DEVICE)
    pw = {"w4a8_g128": packing.quantize_progressive, "w4a8_channel": packing.quantize_channel,
          "fp8": quantize_fp8_weight}[scheme](w.cpu() if scheme != "fp8" else w)
    if scheme != "fp8":
        pw = pw.to(DEVICE)
    f, name = make_linear(LinearSpec(scheme, 64, 256, DEVICE), pw)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    assert rel_err(f(x), x.float() @ w.t()) < 0.2, name


def test_import_is_light():
    import subprocess
    import sys
    code = "import sys, natix.kernels; assert 'triton' not in sys.modules, 'natix.kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True)
