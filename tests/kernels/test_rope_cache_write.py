"""Fused RoPE + KV-cache write equals RoPE followed by the separate write kernels' references."""
import pytest
import torch

from natix.kernels.kv4_cache import KV4Cache
from natix.kernels.rope import cos_sin_table
from natix.kernels.rope_cache_write import rope_cache_write, rope_cache_write_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(t, hq, hk, d, dtype):
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEVICE, dtype=dtype) * 2
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    return qkv, q, k, v


@pytest.mark.parametrize("kind", ["kv4", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_separate_kernels(kind, dtype):
    t, hq, hk, d, page = 9, 6, 2, 64, 16
    table = cos_sin_table(torch.rand(d // 2, device=DEVICE), 256)
    pos = torch.randint(0, 256, (t,), device=DEVICE, dtype=torch.int32)
    slots = torch.randperm(4 * page, device=DEVICE)[:t].to(torch.int32)
    slots[2] = -1  # rope only
    qkv, q, k, v = _inputs(t, hq, hk, d, dtype)
    ref_qkv = qkv.clone()
    rq, rk, rv = (ref_qkv[:, : hq * d].view(t, hq, d), ref_qkv[:, hq * d:(hq + hk) * d].view(t, hk, d),
                  ref_qkv[:, (hq + hk) * d:].view(t, hk, d))
    if kind == "kv4":
        cache, ref = KV4Cache.empty(4, hk, page, d, DEVICE), KV4Cache.empty(4, hk, page, d, DEVICE)
        rope_cache_write(q, k, v, pos, table, slots, kv4=cache)
        rope_cache_write_reference(rq, rk, rv, pos, table, slots, kv4=ref)
        pairs = list(zip(cache.tensors(), ref.tensors()))
    else:
        kc, vc = (torch.zeros(4, hk, page, d, device=DEVICE, dtype=dtype) for _ in range(2))
        rkc, rvc = kc.clone(), vc.clone()
        rope_cache_write(q, k, v, pos, table, slots, k_cache=kc, v_cache=vc)
        rope_cache_write_reference(rq, rk, rv, pos, table, slots, k_cache=rkc, v_cache=rvc)
        pairs = [(kc, rkc), (vc, rvc)]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert float((qkv.float() - ref_qkv.float()).norm() / ref_qkv.float().norm()) < tol
    for a, b in pairs:
        if a.dtype == torch.uint8:  # codes: a rounding boundary may move one code by one
            for sh in (0, 4):
                assert int((((a.int() >> sh) & 15) - ((b.int() >> sh) & 15)).abs().max()) <= 1
            assert float((a != b).float().mean()) < 0.02
        else:
            assert float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-9)) < tol
