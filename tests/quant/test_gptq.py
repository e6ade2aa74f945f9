"""GPTQ solver: beats RTN on correlated activations, equals RTN for H = I, codes round-trip exactly,
act-order / per-channel / progressive (QoQ) grids, and user-facing errors."""

from __future__ import annotations

import pytest
import torch

from natix.kernels import packing
from natix.quant.gptq import (AffineGrid, GptqError, HessianAccumulator, ProgressiveGrid, gptq_quantize,
                              rtn_quantize)

GRIDS = {"asym": AffineGrid(), "sym": AffineGrid(symmetric=True), "qoq": ProgressiveGrid()}


def _correlated(n_tokens: int, k: int) -> torch.Tensor:
    """X = Z @ A with a random mixing A and a few loud input channels: H = 2/n XᵀX is ill-conditioned."""
    z = torch.randn(n_tokens, k)
    a = torch.randn(k, k) / k ** 0.5
    x = z @ a
    x[:, torch.randperm(k)[: k // 16]] *= 8.0  # outlier channels, as in LLM activations
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return (torch.linalg.norm(x @ w.t() - x @ wq.t()) / torch.linalg.norm(x @ w.t())).item()


@pytest.mark.parametrize("grid_name", list(GRIDS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(grid_name: str, act_order: bool) -> None:
    torch.manual_seed(0)
    grid = GRIDS[grid_name]
    n, k = 64, 256
    x, w = _correlated(2048, k), torch.randn(n, k)
    h = _hessian(x)
    static = act_order and grid_name == "qoq"  # the packed g128 format needs contiguous groups
    res = gptq_quantize(w, h, grid, group_size=128, act_order=act_order, static_groups=static)
    rtn = rtn_quantize(w, grid, group_size=128)
    e_gptq, e_rtn = _out_err(x, w, res.dequantized), _out_err(x, w, rtn.dequantized)
    print(f"{grid_name} act_order={act_order}: gptq {e_gptq:.4f} rtn {e_rtn:.4f} ratio {e_gptq / e_rtn:.3f}")
    assert e_gptq <= 0.8 * e_rtn, (e_gptq, e_rtn)
    assert res.codes.min() >= grid.qmin and res.codes.max() <= grid.qmax
    assert torch.equal(res.dequantize(grid), res.dequantized)
    if act_order:
        assert res.perm is not None and torch.equal(torch.sort(res.perm).values, torch.arange(k))
        counts = torch.bincount(res.g_idx, minlength=k // 128)
        assert counts.tolist() == [128] * (k // 128)
    else:
        assert res.perm is None and torch.equal(res.g_idx, torch.arange(k) // 128)


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_identity_hessian_equals_rtn(grid_name: str) -> None:
    torch.manual_seed(1)
    grid = GRIDS[grid_name]
    w = torch.randn(32, 256) * 0.05
    res = gptq_quantize(w, torch.eye(256) * 3.0, grid, group_size=128, percdamp=0.01)
    rtn = rtn_quantize(w, grid, group_size=128)
    assert torch.equal(res.codes, rtn.codes) and torch.equal(res.dequantized, rtn.dequantized)
    if grid_name == "qoq":  # ... and RTN is packing's own reference quantizer, bit for bit
        ref = packing.quantize_progressive(w)
        mine = grid.pack(res)
        for name in ("qweight", "scale", "group_scale", "group_zero"):
            assert torch.equal(getattr(mine, name), getattr(ref, name)), name
        assert torch.equal(packing.dequantize(mine), res.dequantized)


def test_per_channel_matches_packing_and_beats_rtn() -> None:
    torch.manual_seed(2)
    n, k = 48, 576  # SmolLM2's hidden size: not a multiple of 128, so per channel
    x, w = _correlated(2048, k), torch.randn(n, k)
    grid = AffineGrid()
    rtn = rtn_quantize(w, grid, group_size=-1)
    ref = packing.quantize_channel(w)
    assert torch.equal(rtn.codes.to(torch.uint8), packing.unpack_uint4(ref.qweight))
    assert torch.equal(rtn.dequantized, packing.dequantize(ref))
    res = gptq_quantize(w, _hessian(x), grid, group_size=-1, act_order=True)
    assert res.scale.shape == (n, 1) and torch.equal(res.g_idx, torch.zeros(k, dtype=torch.long))
    packed = packing.pack_channel(res.codes.to(torch.uint8), res.zero[:, 0].to(torch.uint8), res.scale[:, 0])
    assert torch.equal(packing.dequantize(packed), res.dequantized)
    e_gptq, e_rtn = _out_err(x, w, res.dequantized), _out_err(x, w, rtn.dequantized)
    print(f"per-channel act_order: gptq {e_gptq:.4f} rtn {e_rtn:.4f} ratio {e_gptq / e_rtn:.3f}")
    assert e_gptq <= 0.8 * e_rtn


def test_progressive_pack_round_trip() -> None:
    torch.manual_seed(3)
    n, k = 32, 256
    x, w = _correlated(1024, k), torch.randn(n, k)
    grid = ProgressiveGrid()
    res = gptq_quantize(w, _hessian(x), grid, group_size=128, act_order=True, static_groups=True)
    packed = grid.pack(res)
    assert torch.equal(packing.dequantize(packed), res.dequantized)
    assert res.scale.max() <= 255 and res.zero.max() <= 15 and torch.equal(res.scale, res.scale.round())
    unstatic = gptq_quantize(w, _hessian(x), grid, group_size=128, act_order=True)
    with pytest.raises(GptqError, match="static_groups=True"):
        grid.pack(unstatic)


def test_block_size_not_aligned_with_groups() -> None:
    """Groups that straddle lazy-batch blocks are fitted on up-to-date values (same result as aligned)."""
    torch.manual_seed(4)
    x, w = _correlated(1024, 256), torch.randn(16, 256)
    h = _hessian(x)
    a = gptq_quantize(w, h, AffineGrid(), group_size=64, block_size=64)
    b = gptq_quantize(w, h, AffineGrid(), group_size=64, block_size=48)
    # mathematically identical; allow a code or two to flip on float-summation order
    assert int((a.codes != b.codes).sum()) <= 2
    c = gptq_quantize(w, h, AffineGrid(), group_size=128, block_size=32)  # groups span 4 blocks
    d = gptq_quantize(w, h, AffineGrid(), group_size=128, block_size=128)
    assert int((c.codes != d.codes).sum()) <= 2


def test_dead_columns() -> None:
    torch.manual_seed(5)
    x, w = _correlated(1024, 128), torch.randn(16, 128)
    x[:, :5] = 0
    res = gptq_quantize(w, _hessian(x), AffineGrid(), group_size=64, act_order=True)
    assert torch.isfinite(res.dequantized).all()
    assert torch.equal(res.dequantized[:, :5], torch.zeros(16, 5))


def test_hessian_accumulator_streams_and_hooks() -> None:
    torch.manual_seed(6)
    lin = torch.nn.Linear(24, 8)
    batches = [torch.randn(3, 7, 24) for _ in range(4)]
    with HessianAccumulator.collect(lin, chunk_rows=5) as acc:
        for b in batches:
            lin(b)
    lin(batches[0])  # the hook is gone after the block
    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert acc.n == 84
    torch.testing.assert_close(acc.hessian(), 2 / 84 * x.t() @ x)
    with pytest.raises(GptqError, match="in_features=24"):
        acc.add(torch.randn(2, 23))
    with pytest.raises(GptqError, match="non-finite"):
        acc.add(torch.full((2, 24), float("inf")))
    with pytest.raises(GptqError, match="no calibration"):
        HessianAccumulator(4).hessian()


def test_errors_name_shapes() -> None:
    torch.manual_seed(7)
    w, h = torch.randn(64, 576), torch.eye(576)
    with pytest.raises(GptqError, match=r"K=576.*\(64, 576\).*group_size=128.*group_size=-1"):
        gptq_quantize(w, h, AffineGrid(), group_size=128)
    with pytest.raises(GptqError, match="non-finite Hessian"):
        gptq_quantize(w, h * float("nan"), AffineGrid(), group_size=-1)
    with pytest.raises(GptqError, match=r"\[576, 576\].*\(64, 576\).*\(10, 10\)"):
        gptq_quantize(w, torch.eye(10), AffineGrid(), group_size=-1)
    with pytest.raises(GptqError, match="2-D"):
        gptq_quantize(torch.randn(4), torch.eye(4), AffineGrid(), group_size=-1)
    with pytest.raises(GptqError, match="group_size in .32, 64, 128.*AffineGrid"):
        gptq_quantize(torch.randn(8, 256), torch.eye(256), ProgressiveGrid(), group_size=-1)


def test_rank_deficient_hessian_gets_more_damping() -> None:
    torch.manual_seed(8)
    x = torch.randn(8, 64)  # 8 tokens: rank 8 < K = 64
    res = gptq_quantize(torch.randn(8, 64), _hessian(x), AffineGrid(), group_size=-1, percdamp=0.0)
    assert res.percdamp > 0 and torch.isfinite(res.dequantized).all()


def test_hessian_consumed_in_place_is_the_same_bits() -> None:
    torch.manual_seed(9)
    acc = HessianAccumulator(16)
    acc.add(torch.randn(40, 16))
    copy = acc.hessian()
    taken = acc.hessian(consume=True)
    assert torch.equal(copy, taken)
    for use in (lambda: acc.hessian(), lambda: acc.add(torch.randn(2, 16))):
        with pytest.raises(GptqError, match="already consumed"):
            use()


@pytest.mark.parametrize("act_order", [False, True])
def test_solver_leaves_the_hessian_alone_and_factors_in_place(act_order: bool) -> None:
    """The inverse factor is the textbook cholesky(cholesky_inverse(cholesky(H + λI)), upper) to the
    bit, computed on one working copy; the caller's H (dead columns included) is never written."""
    from natix.quant.gptq import _inverse_cholesky

    torch.manual_seed(10)
    x = torch.randn(300, 128, dtype=torch.float64)
    x[:, 5] = 0.0  # a dead input column
    h = 2 / 300 * x.t() @ x
    before = h.clone()
    res = gptq_quantize(torch.randn(32, 128), h, AffineGrid(), group_size=64, act_order=act_order)
    assert torch.equal(h, before) and torch.isfinite(res.dequantized).all()
    h[5, 5] = 1.0
    lam = 0.01 * h.diagonal().mean().item()
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + lam * torch.eye(128, dtype=h.dtype))),
                                 upper=True)
    got, damp = _inverse_cholesky(h.clone, 0.01, (32, 128))
    assert damp == 0.01 and torch.equal(got, want)
