"""Paged 16-bit KV cache: write and decode attention vs references and exact attention."""
import pytest
import torch

from natix.kernels.paged_attention import (paged_decode_attention, paged_decode_attention_reference, paged_write,
                                           paged_write_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(lens, hkv, d, page, dtype):
    b = len(lens)
    maxp = max(1, -(-max(lens) // page))
    pages = b * maxp + 2
    perm = torch.randperm(pages)[: b * maxp].view(b, maxp).to(torch.int32)
    slots = torch.cat([perm[i][torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for i, n in enumerate(lens)])
    kc = torch.full((pages, hkv, page, d), float("nan"), dtype=dtype, device=DEVICE)
    return kc, kc.clone(), perm.to(DEVICE), slots.to(DEVICE)


def test_write_matches_reference():
    kc, vc, _, slots = _setup([5, 17], 2, 32, 8, torch.bfloat16)
    rk, rv = kc.clone(), vc.clone()
    k = torch.randn(slots.numel(), 2, 32, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots[2] = -1
    paged_write(kc, vc, k, v, slots)
    paged_write_reference(rk, rv, k, v, slots)
    assert torch.equal(kc.nan_to_num(7), rk.nan_to_num(7)) and torch.equal(vc.nan_to_num(7), rv.nan_to_num(7))


@pytest.mark.parametrize("lens,hq,hkv,page,splits", [
    ([1, 37, 80], 8, 2, 16, 1),
    ([1, 37, 80], 8, 2, 16, 3),
    ([0, 50], 4, 4, 8, 2),  # an empty row, MHA, pages smaller than a token block
])
def test_decode_matches_reference(lens, hq, hkv, page, splits):
    d = 32
    kc, vc, bt, slots = _setup(lens, hkv, d, page, torch.bfloat16)
    k = torch.randn(slots.numel(), hkv, d, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    paged_write(kc, vc, k, v, slots)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=torch.bfloat16)
    ref = paged_decode_attention_reference(q, kc, vc, bt, seq, d ** -0.5)
    out = paged_decode_attention(q, kc, vc, bt, seq, num_splits=splits, block_t=16)
    assert torch.isfinite(out).all()
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err < 1e-2
    # the reference is exact attention over the written tokens
    i = len(lens) - 1
    n = lens[i]
    kk = k[-n:].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    vv = v[-n:].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    exact = torch.softmax(q[i].float()[:, None] @ kk.transpose(1, 2) * d ** -0.5, -1) @ vv
    assert torch.allclose(ref[i].float(), exact[:, 0], atol=2e-2)


def test_errors():
    kc, vc, bt, _ = _setup([4], 2, 32, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.randn(1, 3, 32, device=DEVICE, dtype=torch.bfloat16), kc, vc, bt,
                               torch.tensor([4], dtype=torch.int32, device=DEVICE))
