"""The W8A16 GEMM (int8 weight rows x 16-bit activations, float32 row scales) against its reference,
on awkward shapes (M, N, K not multiples of the tiles), with and without bias; the row quantizer and
the int8 embedding gather. On a machine without CUDA the kernel runs in Triton's interpreter."""
import pytest
import torch

from natix.kernels.w8a16_linear import (dequantize_int8_rows, int8_rows_embedding, quantize_int8_rows, w8a16_config,
                                        w8a16_linear, w8a16_linear_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantize_rows_is_symmetric_absmax_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) * torch.rand(37, 1, generator=g) * 3
    w[5] = 0.0  # an all-zero row: scale 1, codes 0
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (37,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[torch.arange(37) != 5] == 127).all()
    assert s[5] == 1.0 and (q[5] == 0).all()
    deq = dequantize_int8_rows(q, s)
    assert torch.equal(deq, q.float() * s[:, None])
    assert ((deq - w).abs() <= s[:, None] / 2 + 1e-6).all()  # round to nearest: within half a step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 200, 96), (3, 130, 576), (17, 64, 40), (70, 250, 130), (1, 1, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a16_kernel_equals_reference(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    q, s = quantize_int8_rows(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    q, s, x = q.to(DEVICE), s.to(DEVICE), x.to(DEVICE)
    b = b.to(DEVICE) if b is not None else None
    got = w8a16_linear(x, q, s, b)
    ref = w8a16_linear_reference(x, q, s, b)
    assert got.dtype == dtype and got.shape == (m, n)
    # the same float32 products, summed in another order, then one rounding to dtype
    exact = torch.nn.functional.linear(x.float(), dequantize_int8_rows(q, s), None if b is None else b.float())
    tol = exact.abs().max().item() * 2 ** -7 + 1e-6
    assert (got.float() - exact).abs().max().item() <= tol
    assert (got.float() - ref.float()).abs().max().item() <= tol


def test_w8a16_strided_rows_and_empty():
    q, s = (t.to(DEVICE) for t in quantize_int8_rows(torch.randn(48, 64)))
    big = torch.randn(5, 96).to(torch.bfloat16).to(DEVICE)
    x = big[:, :64]  # rows strided, columns contiguous
    got = w8a16_linear(x, q, s)
    exact = torch.nn.functional.linear(x.float(), dequantize_int8_rows(q, s))
    assert (got.float() - exact).abs().max().item() <= exact.abs().max().item() * 2 ** -7
    assert w8a16_linear(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), q, s).shape == (0, 48)


def test_w8a16_bad_inputs_are_named():
    q, s = quantize_int8_rows(torch.randn(8, 16))
    with pytest.raises(ValueError, match="fp16/bf16"):
        w8a16_linear(torch.randn(2, 16), q, s)
    with pytest.raises(ValueError, match="int8"):
        w8a16_linear(torch.randn(2, 16).half(), q.to(torch.uint8), s)
    with pytest.raises(ValueError, match="scale"):
        w8a16_linear(torch.randn(2, 16).half(), q, s.half())
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        w8a16_linear(torch.randn(2, 12).half(), q, s)


def test_configs_cover_decode_and_prefill():
    assert w8a16_config(1)["BM"] == 16 and w8a16_config(64)["BM"] == 64 and w8a16_config(300)["BM"] == 128


def test_embedding_gather_is_rows_times_scales():
    q, s = quantize_int8_rows(torch.randn(30, 24))
    ids = torch.tensor([[0, 29, 3], [3, 3, 7]])
    for dtype in (torch.float32, torch.bfloat16):
        e = int8_rows_embedding(ids, q, s, dtype)
        assert e.dtype == dtype and e.shape == (2, 3, 24)
        assert torch.equal(e, torch.nn.functional.embedding(ids, dequantize_int8_rows(q, s, dtype)))
