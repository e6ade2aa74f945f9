"""silu(gate) * up (+ INT8 per token) vs the reference, on a fused gate/up output."""
import pytest
import torch

from natix.kernels.activation import silu_mul, silu_mul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m,i", [(1, 48), (6, 1536), (3, 5000)])  # 5000: several 4096-wide chunks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(m, i, dtype):
    gu = (torch.randn(m, 2 * i, device=DEVICE) * 3).to(dtype)
    y = silu_mul(gu)
    ref = silu_mul_reference(gu)
    # bf16: two roundings (silu, product); the interpreter's casts truncate, so up to ~1.2e-2 there
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert y.shape == (m, i) and float((y.float() - ref.float()).norm() / ref.float().norm()) < tol
    q, s, sm = silu_mul(gu, quant=True)
    rq, rs, _ = silu_mul_reference(gu, quant=True)
    diff = (q.int() - rq.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(3, diff.numel() // 1000)
    assert torch.allclose(s, rs, rtol=1e-5)
    assert torch.equal(sm, q.int().sum(-1, dtype=torch.int32))
    assert int(q.abs().max()) == 127


def test_strided_rows():
    # a row stride wider than 2I (a slice of a wider buffer) is read correctly
    big = torch.randn(4, 300, device=DEVICE)
    gu = big[:, :256]
    assert torch.allclose(silu_mul(gu), silu_mul_reference(gu.contiguous()), atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="2I"):
        silu_mul(torch.randn(2, 7, device=DEVICE))
