"""Chunked argmax + log-sum-exp equals torch's (ties to the lowest index), bf16 and fp32 logits."""
import pytest
import torch

from natix.kernels.argmax_lse import argmax_lse, argmax_lse_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,v", [(1, 5000), (3, 9000), (2, 100)])
def test_matches_torch(dtype, s, v):
    x = (torch.randn(s, v, device=DEVICE) * 4).to(dtype)
    x[0, 7] = x.float().max() + 1
    if v > 4100:
        x[0, 4100] = x[0, 7]  # a tie across chunks: the first index wins
    tok, mx, lse = argmax_lse(x, chunk=2048)
    rt, rm, rl = argmax_lse_reference(x)
    assert torch.equal(tok, rt) and int(tok[0]) == 7
    assert torch.allclose(mx, rm) and torch.allclose(lse, rl, rtol=1e-5, atol=1e-5)
