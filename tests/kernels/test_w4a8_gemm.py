"""W4A8 GEMM vs its reference: exact int32 accumulators, float outputs by relative error."""
import pytest
import torch

from natix.kernels import packing
from natix.kernels.rmsnorm_quant import quantize_per_token
from natix.kernels.w4a8_gemm import w4a8_gemm, w4a8_gemm_int_reference, w4a8_gemm_reference, w4a8_gemm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))



# (M, N, K, config): M = 1, M not a multiple of BM, N/2 not a multiple of BNH, split-K, K % BK != 0;
# a tuned BK of 128 runs g64 / g32 weights with the K-block cut to the group (fit_block_k)
CASES = [
    (1, 64, 256, dict(BM=16, BNH=16, BK=128, SPLIT_K=2)),
    (37, 96, 384, dict(BM=16, BNH=32, BK=128, SPLIT_K=1)),
    (20, 160, 256, dict(BM=16, BNH=32, BK=128, SPLIT_K=2)),
    (7, 64, 576, dict(BM=16, BNH=32, BK=128, SPLIT_K=2)),  # SmolLM2's width: g64, g32 and per channel
    (5, 32, 200, dict(BM=16, BNH=16, BK=64, SPLIT_K=3)),  # per-channel only (K % 32 != 0)
]
GROUPS = [128, 64, 32, 0]  # 0: per channel
GROUP_IDS = ["g128", "g64", "g32", "channel"]


def _weights(n, k, group, device):
    """Round-to-nearest weights in groups of ``group`` (0: per channel)."""
    w = torch.randn(n, k)
    pw = packing.quantize_progressive(w, group) if group else packing.quantize_channel(w)
    return pw.to(device)


@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_int_accumulator_exact(m, n, k, cfg, group):
    if group and k % group:
        pytest.skip(f"g{group} needs K % {group} == 0 (tested in test_errors)")
    w = _weights(n, k, group, DEVICE)
    xq, xs, xsum = quantize_per_token(torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16))
    ref = w4a8_gemm_int_reference(xq, w)
    out = w4a8_gemm_triton(xq, xs, xsum, w, None, torch.int32, cfg)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,cfg", CASES[:3])
def test_float_output(m, n, k, cfg, group, out_dtype):
    if group in (32,) and out_dtype == torch.float16:
        pytest.skip("g32 is covered by the int accumulator and bf16 cases")
    w = _weights(n, k, group, DEVICE)
    bias = torch.randn(n, device=DEVICE)
    xq, xs, xsum = quantize_per_token(torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16))
    ref = w4a8_gemm_reference(xq, xs, w, bias, torch.float32)
    out = w4a8_gemm_triton(xq, xs, xsum, w, bias, out_dtype, cfg)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert rel_err(out, ref) < (8e-3 if out_dtype == torch.bfloat16 else 1e-3)


def test_op_poisoned_output_and_dequant_matches_float():
    """The custom op end to end; the result approximates the float GEMM of the dequantized operands."""
    m, n, k = 3, 64, 256
    w = _weights(n, k, 128, DEVICE)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    xq, xs, xsum = quantize_per_token(x)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    out.copy_(w4a8_gemm(xq, xs, w, xsum))
    ref = (xq.float() * xs[:, None]) @ packing.dequantize(w).t()
    assert rel_err(out, ref) < 8e-3


def test_errors():
    w = _weights(64, 256, 128, DEVICE)
    xq = torch.zeros(4, 192, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="K mismatch"):
        w4a8_gemm_triton(xq, torch.ones(4, device=DEVICE), None, w)
    with pytest.raises(ValueError, match="K % 128"):
        packing.quantize_progressive(torch.randn(64, 200))
    with pytest.raises(ValueError, match="K % 64"):
        packing.quantize_progressive(torch.randn(64, 576 + 32), 64)
    with pytest.raises(ValueError, match="one of"):
        packing.quantize_progressive(torch.randn(64, 256), 16)
    g = packing.quantize_progressive(torch.randn(64, 256), 64)
    assert g.group_size == 64 and tuple(g.group_scale.shape) == (4, 64)
    with pytest.raises(ValueError, match="group_scale"):  # 256 // 3 is no group size
        packing.W4A8Weight(g.qweight, g.scale, g.group_scale[:3].contiguous(), g.group_zero[:3].contiguous()).validate()
    with pytest.raises(ValueError, match="cannot fuse.*g128.*g64"):
        packing.concat_packed([g, packing.quantize_progressive(torch.randn(64, 256))])
    with pytest.raises(ValueError, match="even"):
        packing.quantize_channel(torch.randn(63, 64))
    wc = _weights(64, 256, 0, DEVICE)
    with pytest.raises(ValueError, match="x_sum"):
        w4a8_gemm_triton(torch.zeros(4, 256, dtype=torch.int8, device=DEVICE), torch.ones(4, device=DEVICE), None, wc)


def test_packing_roundtrip():
    q4 = torch.randint(0, 16, (10, 256), dtype=torch.uint8)
    assert torch.equal(packing.unpack_uint4(packing.pack_uint4(q4)), q4)
    w = torch.randn(10, 256)
    err = (packing.dequantize(packing.quantize_progressive(w)) - w).norm() / w.norm()
    assert err < 0.15


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("m", [1, 16, 67, 256])
def test_gpu_llama_shape_default_configs(m, group):
    n, k = 6144, 4096
    w = _weights(n, k, group, "cuda")
    xq, xs, xsum = quantize_per_token(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    out = torch.full((m, n), 0x7F, dtype=torch.int32, device="cuda")
    out.copy_(w4a8_gemm_triton(xq, xs, xsum, w, None, torch.int32))
    assert torch.equal(out, w4a8_gemm_int_reference(xq, w))


def test_g128_full_uint8_level1_range_exact(full_range_progressive):
    """Level-1 scales up to 255 (q4 * s1 up to 3825 > one byte): the kernel's two-codes-per-16-bit-lane
    multiply-subtract must still give q4 * s1 - sz exactly for every format-valid input."""
    n, k, m = 64, 256, 5
    w = full_range_progressive(n, k, 128).to(DEVICE)
    assert int(w.group_scale.max()) > 16  # the case byte-wide products would get wrong
    xq, xs, xsum = quantize_per_token(torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16))
    out = w4a8_gemm_triton(xq, xs, xsum, w, None, torch.int32, dict(BM=16, BNH=16, BK=64, SPLIT_K=2))
    assert torch.equal(out, w4a8_gemm_int_reference(xq, w))


@pytest.mark.parametrize("group", [128, 64], ids=["g128", "g64"])
@pytest.mark.parametrize("epi", ["0", "1"], ids=["dequant-then-dot", "dot-then-level1"])
def test_both_level1_paths_exact(group, epi, monkeypatch, full_range_progressive):
    """Level 1 before the dot (per weight) and after it (per K-block: s1 * (x . q4) - sz * sum x) give
    the same exact accumulator, with split-K and a partial last M tile; the full uint8 s1 range."""
    monkeypatch.setenv("NATIX_W4A8_GROUP_EPI", epi)
    n, k, m = 64, 384, 19
    w = full_range_progressive(n, k, group).to(DEVICE)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEVICE)  # full-range codes: the largest terms
    xs = torch.rand(m, device=DEVICE) + 0.1
    out = w4a8_gemm_triton(xq, xs, None, w, None, torch.int32, dict(BM=16, BNH=16, BK=group, SPLIT_K=2))
    assert torch.equal(out, w4a8_gemm_int_reference(xq, w))


def test_config_table_lookup(monkeypatch):
    """A tuned entry is found by (card, variant, N, K, M bucket); the expanded-g128 GEMM (``w8``) takes its own
    entry, else the per-channel one; a missing entry falls back to the heuristic default."""
    from natix.kernels import w4a8_gemm as g

    chan = dict(BM=64, BNH=64, BK=128, SPLIT_K=1)
    w8 = dict(BM=128, BNH=64, BK=128, SPLIT_K=1)
    table = {"cpu": {"channel": {"64,128": {"16": chan, "64": chan}}, "w8": {"64,128": {"64": w8}}}}
    monkeypatch.setattr(g, "_load_configs", lambda: table)
    cpu = torch.device("cpu")
    assert g.get_config(9, 64, 128, False, cpu) == chan  # M = 9 is in the 16 bucket
    assert g.get_config(64, 64, 128, True, cpu, w8=True) == w8
    assert g.get_config(16, 64, 128, True, cpu, w8=True) == chan
    assert g.get_config(16, 64, 128, True, cpu) == g.default_config(16, 64, 128, True)
