"""Residual add + RMSNorm (+ INT8) vs the reference, in place on the residual stream."""
import pytest
import torch

from natix.kernels.fused_norm import add_rmsnorm, add_rmsnorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA


@pytest.mark.parametrize("m,h", [(1, 64), (5, 200), (17, 576)])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(m, h, with_delta, dtype):
    hs = torch.randn(m, h, device=DEVICE, dtype=dtype) * 2
    delta = torch.randn(m, h, device=DEVICE, dtype=dtype) if with_delta else None
    w = (torch.rand(h, device=DEVICE) + 0.5).to(dtype)
    h_ref = hs.clone()
    y = add_rmsnorm(hs, delta, w, 1e-5)
    ref = add_rmsnorm_reference(h_ref, delta, w, 1e-5)
    # the residual is updated in place, rounded to its dtype (the interpreter's bf16 casts may
    # round differently from torch's by one unit in the last place)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(hs.float(), h_ref.float(), rtol=tol, atol=0)
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_output(dtype):
    hs = torch.randn(9, 384, device=DEVICE, dtype=dtype) * 3
    delta = torch.randn_like(hs)
    w = (torch.rand(384, device=DEVICE) + 0.5).to(dtype)
    h_ref = hs.clone()
    q, s, sm = add_rmsnorm(hs, delta, w, 1e-6, quant=True)
    add_rmsnorm_reference(h_ref, delta, w, 1e-6)
    assert torch.allclose(hs.float(), h_ref.float(), rtol=1e-2, atol=0)
    # quantize the kernel's own residual (the interpreter's bf16 add may round differently)
    rq, rs, _ = add_rmsnorm_reference(hs.clone(), None, w, 1e-6, quant=True)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and sm.dtype == torch.int32
    diff = (q.int() - rq.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 4  # boundary rounding only
    assert torch.allclose(s, rs, rtol=1e-5)
    assert torch.equal(sm, q.int().sum(-1, dtype=torch.int32))
    # the codes reconstruct RMSNorm(h) * w
    y = add_rmsnorm_reference(hs.float(), None, w.float(), 1e-6)
    assert float(((q.float() * s[:, None] - y.float()).norm() / y.float().norm())) < 1e-2


def test_errors():
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(torch.randn(2, 8, device=DEVICE), None, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="delta"):
        add_rmsnorm(torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE), torch.ones(8, device=DEVICE))
