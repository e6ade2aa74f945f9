"""KV4 decode partials + fused merge/INT8 equal decode attention (reference) then per-token quantization."""
import torch

from natix.kernels.attn_combine_quant import combine_quant, combine_quant_reference, kv4_decode_partials
from natix.kernels.kv4_cache import KV4Cache, kv4_write
from natix.kernels.kv4_decode_attention import kv4_decode_attention_reference
from natix.kernels.rmsnorm_quant import rmsnorm_quant_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_fused_merge_and_quant_match_the_separate_path():
    torch.manual_seed(0)
    lens, hq, hkv, d, page = [5, 130, 64], 8, 2, 64, 64
    maxp = 3
    cache = KV4Cache.empty(len(lens) * maxp + 1, hkv, page, d, DEVICE)
    bt = torch.arange(1, len(lens) * maxp + 1, dtype=torch.int32, device=DEVICE).view(len(lens), maxp)
    slots = torch.cat([bt[i][torch.arange(n, device=DEVICE) // page].long() * page + torch.arange(n, device=DEVICE) % page
                       for i, n in enumerate(lens)]).to(torch.int32)
    k = torch.randn(slots.numel(), hkv, d, device=DEVICE, dtype=torch.bfloat16)
    kv4_write(cache, k, torch.randn_like(k), slots)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=torch.bfloat16)
    po, pml = kv4_decode_partials(q, cache, bt, seq, d ** -0.5, num_splits=3)
    # (the Triton interpreter truncates bf16 casts; its fp16 casts round like torch's)
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    xq, xs, xsum = combine_quant(po, pml, dt)
    # the fused kernel vs its own reference: the same codes up to boundary rounding
    rq, rs, _ = combine_quant_reference(po, pml, dt)
    diff = (xq.int() - rq.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 4
    assert torch.allclose(xs, rs, rtol=1e-3) and torch.equal(xsum, xq.int().sum(-1, dtype=torch.int32))
    # and the whole path vs reference attention then quantization
    att = kv4_decode_attention_reference(q, cache, bt, seq, d ** -0.5)
    eq, es, _ = rmsnorm_quant_reference(att.reshape(len(lens), -1), None)
    deq, ref = xq.float() * xs[:, None], eq.float() * es[:, None]
    assert float((deq - ref).norm() / ref.norm()) < 2e-2
