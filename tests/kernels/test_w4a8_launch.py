"""The prepared W4A8 GEMM equals the general op, and fused (concatenated) weights equal their parts."""
import pytest
import torch

from natix.kernels.packing import concat_packed, dequantize, quantize_channel, quantize_progressive
from natix.kernels.rmsnorm_quant import rmsnorm_quant_reference
from natix.kernels.w4a8_gemm import w4a8_gemm_reference
from natix.kernels.w4a8_launch import W4A8Gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("group", [128, 64, 0], ids=["g128", "g64", "channel"])
@pytest.mark.parametrize("m", [1, 19])
def test_prepared_equals_reference(group, m):
    n, k = 96, 320 if group == 64 else 256  # g64: K not a multiple of 128, the tuned BK of 128 cut to 64
    w = (quantize_progressive(torch.randn(n, k), group) if group else quantize_channel(torch.randn(n, k))).to(DEVICE)
    bias = torch.randn(n, device=DEVICE)
    xq, xs, xsum = rmsnorm_quant_reference(torch.randn(m, k, device=DEVICE), None)
    g = W4A8Gemm(w, bias, out_dtype=torch.float32)
    ref = w4a8_gemm_reference(xq, xs, w, bias, torch.float32)
    assert torch.allclose(g(xq, xs, xsum), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(g.reference(xq, xs), ref, rtol=1e-6, atol=1e-5)
    raw = W4A8Gemm(w, None, out_dtype=torch.int32)(xq, xs, xsum)
    assert torch.equal(raw, w4a8_gemm_reference(xq, xs, w, None, torch.int32))


@pytest.mark.parametrize("flags", ["meta+xsum_dot", "meta", "xsum_dot", "neither"])
@pytest.mark.parametrize("epi", ["0", "1"], ids=["dequant-then-dot", "dot-then-level1"])
@pytest.mark.parametrize("group", [128, 32], ids=["g128", "g32"])
def test_prepared_level1_variants_exact(group, epi, flags, monkeypatch, full_range_progressive):
    """The prepared GEMM's level-1 reads (packed (s1, sz) words or four byte loads) and its block sums
    of codes (a dot with ones or a reduction) give the exact accumulator for the full uint8 level-1
    range (the packed word's top byte sets the int32 sign bit), at M = 1 and with a partial M tile.
    Packed words are read with level 1 after the dot only (at M = 19 the default tile is 64 rows,
    where that path is off unless NATIX_W4A8_GROUP_EPI=1 forces it)."""
    monkeypatch.setenv("NATIX_W4A8_GROUP_EPI", epi)
    monkeypatch.setenv("NATIX_W4A8_META", "1" if "meta" in flags else "0")
    monkeypatch.setenv("NATIX_W4A8_XSUM_DOT", "1" if "xsum_dot" in flags else "0")
    w = full_range_progressive(64, 256, group).to(DEVICE)
    g = W4A8Gemm(w, None, out_dtype=torch.int32, gemv=False)
    for m in (1, 19):
        xq = torch.randint(-127, 128, (m, 256), dtype=torch.int8, device=DEVICE)
        xs = torch.rand(m, device=DEVICE) + 0.1
        assert torch.equal(g(xq, xs), w4a8_gemm_reference(xq, xs, w, None, torch.int32)), m


@pytest.mark.parametrize("group", [128, 64, 32], ids=["g128", "g64", "g32"])
def test_expanded_int8_weights_exact(group, full_range_progressive):
    """Compute-bound sizes expand progressive weights to their INT8 level 1 and run the INT8-weight GEMM:
    the expansion is `integer_weight` and the GEMM's accumulator is exact (full level-1 range, a
    partial row tile, a bias); the float output matches the unexpanded path."""
    from natix.kernels.packing import integer_weight
    from natix.kernels.w4a8_expand import Expander

    w = full_range_progressive(96, 256, group).to(DEVICE)
    assert torch.equal(Expander(w)().to(torch.int32), integer_weight(w))
    bias = torch.randn(96, device=DEVICE)
    for m in (1, 19):
        xq = torch.randint(-127, 128, (m, 256), dtype=torch.int8, device=DEVICE)
        xs = torch.rand(m, device=DEVICE) + 0.1
        raw = W4A8Gemm(w, None, out_dtype=torch.int32, gemv=False, expand_m=1)
        assert raw._plan(m, xq.device)[-1] is not None  # the expanded path ran
        assert torch.equal(raw(xq, xs), w4a8_gemm_reference(xq, xs, w, None, torch.int32)), m
        y = W4A8Gemm(w, bias, out_dtype=torch.float32, gemv=False, expand_m=1)(xq, xs)
        assert torch.allclose(y, W4A8Gemm(w, bias, out_dtype=torch.float32, gemv=False, expand_m=0)(xq, xs),
                              rtol=1e-6, atol=1e-3)


def test_expand_threshold():
    """Progressive weights expand from ``expand_m`` rows (env default); per-channel weights never."""
    wg, wc = quantize_progressive(torch.randn(64, 128)).to(DEVICE), quantize_channel(torch.randn(64, 128)).to(DEVICE)
    assert W4A8Gemm(wg, expand_m=4).expand_m == 4
    assert W4A8Gemm(wc, expand_m=4).expand_m == 0
    assert W4A8Gemm(wg, expand_m=0).expand_m == 0
    x = torch.zeros(3, 128, dtype=torch.int8, device=DEVICE)
    g = W4A8Gemm(wg, gemv=False, expand_m=4)
    assert g._plan(3, x.device)[-1] is None and g._plan(4, x.device)[-1] is not None


@pytest.mark.parametrize("quant", [quantize_progressive, lambda w: quantize_progressive(w, 32), quantize_channel],
                         ids=["g128", "g32", "channel"])
def test_concat_packed(quant):
    parts = [quant(torch.randn(n, 128)) for n in (64, 16, 16)]
    fused = concat_packed(parts)
    assert fused.n == 96 and fused.k == 128
    assert torch.equal(dequantize(fused), torch.cat([dequantize(p) for p in parts]))


def test_concat_refuses_mixed():
    with pytest.raises(ValueError, match="fuse"):
        concat_packed([quantize_progressive(torch.randn(8, 128)), quantize_channel(torch.randn(8, 128))])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inline PTX does not run in the interpreter)")
@pytest.mark.parametrize("group", [128, 0], ids=["g128", "channel"])
def test_byte_unpack_exact(group, monkeypatch, full_range_progressive):
    """The inline-PTX unpacking of raw codes (NATIX_W4A8_BYTES=1, the CUDA default) and the word-wide one
    both give the exact accumulator, at decode and prefill-sized M, with misaligned activations."""
    w = (full_range_progressive(256, 512, group) if group else quantize_channel(torch.randn(256, 512))).to("cuda")
    for flag in ("0", "1"):
        monkeypatch.setenv("NATIX_W4A8_BYTES", flag)
        g = W4A8Gemm(w, None, out_dtype=torch.int32, gemv=False)
        for m in (1, 16, 19, 64, 300):
            xq = torch.randint(-127, 128, (m, 516), dtype=torch.int8, device="cuda")[:, 4:]
            xs = torch.ones(m, device="cuda")
            ref = w4a8_gemm_reference(xq, xs, w, None, torch.int32)
            assert torch.equal(g(xq, xs, xq.sum(1, dtype=torch.int32)), ref), (flag, m)
