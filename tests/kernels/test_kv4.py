"""KV4 quantize-on-write and decode attention vs references (paged cache, GQA, ragged lengths)."""
import pytest
import torch

from natix.kernels.kv4_cache import KV4Cache, kv4_write, kv4_write_reference
from natix.kernels.kv4_decode_attention import kv4_decode_attention, kv4_decode_attention_reference, kv4_decode_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))




def _setup(lens, hkv, d, page, device, group_size=-1):
    b = len(lens)
    maxp = max(1, -(-max(lens) // page))
    pages = b * maxp + 3
    perm = torch.randperm(pages)[: b * maxp].view(b, maxp).to(torch.int32)
    slots = torch.cat([perm[i][torch.arange(n) // page].long() * page + torch.arange(n) % page for i, n in enumerate(lens)])
    cache = KV4Cache.empty(pages, hkv, page, d, device, group_size)
    # poison: the kernels must write every slot they are given
    for t in cache.tensors():
        t.fill_(0x7F) if t.dtype == torch.uint8 else t.fill_(float("nan"))
    return cache, perm.to(device), slots.to(device)


@pytest.mark.parametrize("group_size", [-1, 32, 16])
def test_write_matches_reference(group_size):
    cache, _, slots = _setup([5, 17], 2, 64, 16, DEVICE, group_size)
    ref, _, _ = _setup([5, 17], 2, 64, 16, DEVICE, group_size)
    assert cache.num_groups == (1 if group_size == -1 else 64 // group_size)
    for a, b in zip(cache.tensors(), ref.tensors()):
        b.copy_(a)
    k = torch.randn(slots.numel(), 2, 64, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots[3] = -1  # padding token: skipped
    kv4_write(cache, k, v, slots.to(torch.int32))
    kv4_write_reference(ref, k, v, slots)
    for a, b in zip(cache.tensors(), ref.tensors()):
        if a.dtype == torch.uint8:
            lo = (a.int() & 15) - (b.int() & 15)
            hi = (a.int() >> 4) - (b.int() >> 4)
            assert int(lo.abs().max()) <= 1 and int(hi.abs().max()) <= 1
            assert float((a != b).float().mean()) < 2e-3
        else:
            assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))


@pytest.mark.parametrize("swap,group_size", [(False, -1), (True, -1), (True, 32), (True, 16)],
                         ids=["rows", "swap", "swap-g32", "swap-g16"])
@pytest.mark.parametrize("lens,hq,hkv,splits,bt,page", [
    ([1, 37, 80], 8, 2, 1, 16, 16),
    ([1, 37, 80], 8, 2, 3, 16, 32),  # two blocks per page (one page-table read per block)
    ([0, 50], 4, 4, 2, 32, 16),  # an empty row, MHA, and a block spanning two pages
])
def test_decode_matches_reference(lens, hq, hkv, splits, bt, page, swap, group_size):
    torch.manual_seed(0)  # the 4-bit-vs-bf16 bound below is statistical: a fixed draw keeps it deterministic
    d = 64
    cache, bt_, slots = _setup(lens, hkv, d, page, DEVICE, group_size)
    k = torch.randn(slots.numel(), hkv, d, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kv4_write(cache, k, v, slots)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=torch.bfloat16)
    ref = kv4_decode_attention_reference(q, cache, bt_, seq, d ** -0.5)
    out = kv4_decode_attention_triton(q, cache, bt_, seq, d ** -0.5, num_splits=splits, block_t=bt, swap=swap)
    assert rel_err(out, ref) < 1e-2
    # and the quantization error of the whole path vs bf16 attention stays small
    if 0 not in lens:
        i = len(lens) - 1
        n = lens[i]
        kk = k[-n:].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vv = v[-n:].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        exact = torch.softmax(q[i].float()[:, None] @ kk.transpose(1, 2) * d ** -0.5, -1) @ vv
        assert rel_err(out[i], exact[:, 0]) < 0.15


@pytest.mark.parametrize("group_size", [32, 16])
def test_decode_groups_stacked_wider_than_one_mma(group_size):
    """d=128 with 3 query heads per KV head: the stacked group columns are 8 (g32) and 16 (g16) wide, with
    padded heads inside each group's block of columns."""
    torch.manual_seed(1)
    lens, hq, hkv, d = [9, 70], 6, 2, 128
    cache, bt_, slots = _setup(lens, hkv, d, 16, DEVICE, group_size)
    k = torch.randn(slots.numel(), hkv, d, device=DEVICE, dtype=torch.bfloat16)
    kv4_write(cache, k, torch.randn_like(k), slots)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE, dtype=torch.bfloat16)
    ref = kv4_decode_attention_reference(q, cache, bt_, seq, d ** -0.5)
    for splits in (1, 2):
        out = kv4_decode_attention_triton(q, cache, bt_, seq, d ** -0.5, num_splits=splits, block_t=16)
        assert rel_err(out, ref) < 1e-2, splits


@pytest.mark.parametrize("group_size", [-1, 32, 16])
def test_gather_matches_dequantize_pages(group_size):
    """kv4_gather (one launch: page gather, dequantization, token-major layout) = the torch reference."""
    from natix.kernels.kv4_cache import dequantize_pages, kv4_gather

    cache, bt_, slots = _setup([48], 2, 64, 16, DEVICE, group_size)
    k = torch.randn(slots.numel(), 2, 64, device=DEVICE, dtype=torch.bfloat16)
    kv4_write(cache, k, torch.randn_like(k), slots)
    pages = bt_[0].flip(0).long()  # the written pages, out of order
    gk, gv = kv4_gather(cache, pages, torch.bfloat16, triton_kernel=True)
    for got, (c, sc, zr) in ((gk, (cache.k, cache.k_scale, cache.k_zero)), (gv, (cache.v, cache.v_scale, cache.v_zero))):
        ref = dequantize_pages(c[pages], sc[pages], zr[pages]).permute(0, 2, 1, 3).reshape(-1, 2, 64)  # float32
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        # within one bf16 rounding of the float32 value (the interpreter truncates, the GPU rounds to nearest)
        assert bool(((got.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all())


def test_op_and_errors():
    cache, bt_, slots = _setup([20], 2, 64, 16, DEVICE)
    k = torch.randn(20, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    kv4_write(cache, k, k, slots)
    q = torch.randn(1, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    seq = torch.tensor([20], dtype=torch.int32, device=DEVICE)
    out = kv4_decode_attention(q, cache, bt_, seq)
    assert rel_err(out, kv4_decode_attention_reference(q, cache, bt_, seq, 0.125)) < 1e-2
    with pytest.raises(ValueError, match="multiple"):
        kv4_decode_attention(torch.randn(1, 3, 64, device=DEVICE), cache, bt_, seq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gpu_ragged_long(group_size):
    lens = [1, 1000, 4096, 3333]
    cache, bt_, slots = _setup(lens, 8, 128, 64, "cuda", group_size)
    k = torch.randn(slots.numel(), 8, 128, device="cuda", dtype=torch.bfloat16)
    kv4_write(cache, k, torch.randn_like(k), slots)
    seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    ref = kv4_decode_attention_reference(q, cache, bt_, seq, 128 ** -0.5)
    for splits, bt, swap in ((None, 64, False), (1, 64, False), (7, 64, False), (None, 64, True), (1, 64, True),
                             (7, 64, True), (3, 128, True)):
        if group_size != -1 and not swap:
            continue
        out = kv4_decode_attention_triton(q, cache, bt_, seq, 128 ** -0.5, num_splits=splits, max_len=4096,
                                          block_t=bt, swap=swap)
        assert rel_err(out, ref) < 1e-2, (splits, bt, swap)
