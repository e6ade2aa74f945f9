"""In-place rotary embedding on strided q/k views vs transformers' own apply_rotary_pos_emb."""
import pytest
import torch

from natix.kernels.rope import cos_sin_table, rope_, rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, hq, hk, d = 11, 6, 2, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    table = cos_sin_table(inv_freq.to(DEVICE), 512)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE, dtype=dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    pos = torch.randint(0, 512, (t,), device=DEVICE)
    # transformers: [B, H, T, D] with cos/sin [B, T, D]
    freqs = pos.float()[:, None] * inv_freq.to(DEVICE)[None, :]
    emb = torch.cat([freqs, freqs], -1)
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None].clone(), k.transpose(0, 1)[None].clone(),
                                  emb.cos()[None].to(dtype), emb.sin()[None].to(dtype))
    v_before = qkv[:, (hq + hk) * d:].clone()
    rope_(q, k, pos, table)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(q.float(), rq[0].transpose(0, 1).float(), atol=tol, rtol=tol)
    assert torch.allclose(k.float(), rk[0].transpose(0, 1).float(), atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)  # v untouched


def test_reference_equals_kernel_fp32():
    d = 32
    table = cos_sin_table(torch.rand(d // 2, device=DEVICE), 64)
    q = torch.randn(5, 4, d, device=DEVICE)
    k = torch.randn(5, 1, d, device=DEVICE)
    pos = torch.arange(5, device=DEVICE)
    q2, k2 = q.clone(), k.clone()
    rope_(q, k, pos, table)
    rope_reference(q2, k2, pos, table)
    assert torch.allclose(q, q2, atol=1e-6) and torch.allclose(k, k2, atol=1e-6)


def test_errors():
    table = cos_sin_table(torch.rand(8, device=DEVICE), 8)
    with pytest.raises(ValueError, match="cos_sin"):
        rope_(torch.randn(2, 2, 32, device=DEVICE), torch.randn(2, 1, 32, device=DEVICE), torch.zeros(2, device=DEVICE),
              table)
