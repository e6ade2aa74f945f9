"""The direct launcher computes what the JIT path computes, across specializations (M = 1 vs 17,
misaligned views): a compiled kernel is never reused for arguments it was not specialized for."""
import torch

from natix.kernels.launch import Launcher, _key
from natix.kernels.packing import quantize_channel
from natix.kernels.rmsnorm_quant import quantize_per_token
from natix.kernels.w4a8_gemm import w4a8_gemm_reference
from natix.kernels.w4a8_launch import W4A8Gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_key_follows_triton_specialization():
    t = torch.zeros(8, device=DEVICE)
    assert _key((t, 1, 16, 17, 2**40)) == ((torch.float32, True), (True, False, True), (False, True, True),
                                            (False, False, True), (False, True, False))
    assert _key((t[1:],))[0] == (torch.float32, False)  # a 4-byte offset view is not 16-byte aligned
    assert _key((t.half(),))[0] == (torch.float16, True)  # another dtype: another compiled kernel


def test_direct_launch_matches_reference_across_shapes():
    w = quantize_channel(torch.randn(64, 128)).to(DEVICE)
    g = W4A8Gemm(w, None, out_dtype=torch.float32)
    for m in (1, 17, 1, 33, 17):
        xq, xs, xsum = quantize_per_token(torch.randn(m, 128, device=DEVICE))
        assert torch.allclose(g(xq, xs, xsum), w4a8_gemm_reference(xq, xs, w, None, torch.float32), rtol=1e-5, atol=1e-4)
    big = torch.randint(-127, 128, (17, 136), dtype=torch.int8, device=DEVICE)
    xq = big[:, 4:132]  # 4 bytes off 16-byte alignment, row stride 136: another specialization
    xs = torch.rand(17, device=DEVICE) + 0.1
    xsum = xq.sum(1, dtype=torch.int32)
    assert torch.allclose(g(xq, xs, xsum), w4a8_gemm_reference(xq, xs, w, None, torch.float32), rtol=1e-5, atol=1e-4)
    launchers = [c["launch"] for c in g._configs.values()]
    assert launchers and all(isinstance(x, Launcher) for x in launchers)
    if DEVICE == "cuda":  # one compiled entry per specialization seen, and the direct path in use
        assert all(x.direct for x in launchers), [x.why_not_direct for x in launchers]


def test_an_in_place_kernel_runs_once_per_call():
    from natix.kernels.fused_norm import add_rmsnorm, add_rmsnorm_reference

    for _ in range(3):  # the first call of a shape compiles and learns the layout; it must still add once
        h = torch.randn(3, 64, device=DEVICE)
        d = torch.randn_like(h)
        w = torch.ones(64, device=DEVICE)
        ref = h.clone()
        add_rmsnorm(h, d, w, 1e-6)
        add_rmsnorm_reference(ref, d, w, 1e-6)
        assert torch.allclose(h, ref, atol=1e-6)
