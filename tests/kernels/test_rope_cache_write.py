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


@pytest.mark.parametrize("kind", ["kv4", "kv4-g32", "kv4-g16", "paged"])
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
    if kind.startswith("kv4"):
        gs = int(kind[5:]) if "-g" in kind else -1
        cache, ref = KV4Cache.empty(4, hk, page, d, DEVICE, gs), KV4Cache.empty(4, hk, page, d, DEVICE, gs)
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


# ----------------------------------------------------------------------------- head rotation (rotate_keys)
def _rotation_case(t, hq, hk, d, dtype, page, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = cos_sin_table(torch.rand(d // 2, generator=g).to(DEVICE), 256)
    pos = torch.randint(0, 256, (t,), generator=g).to(device=DEVICE, dtype=torch.int32)
    slots = torch.randperm(4 * page, generator=g)[:t].to(device=DEVICE, dtype=torch.int32)
    slots[1] = -1  # padding: rope and rotation only, no write
    qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=g) * 2).to(device=DEVICE, dtype=dtype)
    qkv[:, hq * d + 5:(hq + hk) * d:d] *= 15  # an outlier key channel, what the rotation is for
    return table, pos, slots, qkv


def _views(qkv, hq, hk, d):
    t = qkv.shape[0]
    return (qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d),
            qkv[:, (hq + hk) * d:].view(t, hk, d))


def _assert_codes_close(a, b, frac):
    for sh in (0, 4):  # a rounding boundary may move one code by one
        assert int((((a.int() >> sh) & 15) - ((b.int() >> sh) & 15)).abs().max()) <= 1
    assert float((a != b).float().mean()) <= frac


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotation_matches_reference(d, dtype):
    """RoPE, q·H and k·H, and the KV4 write of k·H in one launch equal the reference (rope_reference,
    the float32 product rounded to the dtype, kv4_write_reference), GQA, one padded slot."""
    from natix.quant.qoq import head_rotation

    t, hq, hk, page = 7, 6, 2, 16
    rot = head_rotation(d).float().to(DEVICE)
    table, pos, slots, qkv = _rotation_case(t, hq, hk, d, dtype, page)
    ref_qkv = qkv.clone()
    cache, ref = KV4Cache.empty(4, hk, page, d, DEVICE), KV4Cache.empty(4, hk, page, d, DEVICE)
    rope_cache_write(*_views(qkv, hq, hk, d), pos, table, slots, kv4=cache, rotation=rot)
    rope_cache_write_reference(*_views(ref_qkv, hq, hk, d), pos, table, slots, kv4=ref, rotation=rot)
    # the reference's RoPE multiplies in the dtype, the kernel's in float32 (as the separate rope
    # kernel): a 16-bit ulp there, spread over the row by H
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert float((qkv.float() - ref_qkv.float()).norm() / ref_qkv.float().norm()) < tol
    kq, kr = _views(qkv, hq, hk, d)[1], _views(ref_qkv, hq, hk, d)[1]
    assert float((kq.float() - kr.float()).norm() / kr.float().norm()) < tol
    for a, b in zip(cache.tensors(), ref.tensors()):
        if a.dtype == torch.uint8:
            _assert_codes_close(a, b, 0.01 if dtype == torch.float32 else 0.05)
        else:
            assert float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-9)) < max(tol, 1e-3)
    # the padded token wrote nothing: exactly the other tokens' (page, head, offset) rows have a scale
    assert int((cache.k_scale != 0).sum()) == (t - 1) * hk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotation_matches_the_separate_kernels(dtype):
    """The fused launch with rotation equals the previous three steps on the GPU path (rope_triton,
    the float32 matmul rounded to the dtype, kv4_write_triton) up to the float32 summation order of
    the product: q and k within one ulp of the dtype, codes within one step."""
    from natix.kernels.kv4_cache import kv4_write_triton
    from natix.kernels.rope import rope_triton
    from natix.quant.qoq import head_rotation

    t, hq, hk, d, page = 6, 4, 2, 64, 8
    rot = head_rotation(d).float().to(DEVICE)
    table, pos, slots, qkv = _rotation_case(t, hq, hk, d, dtype, page, seed=1)
    sep_qkv = qkv.clone()
    cache, sep = KV4Cache.empty(4, hk, page, d, DEVICE), KV4Cache.empty(4, hk, page, d, DEVICE)
    q, k, v = _views(qkv, hq, hk, d)
    rope_cache_write(q, k, v, pos, table, slots, kv4=cache, rotation=rot)
    sq, sk, sv = _views(sep_qkv, hq, hk, d)
    rope_triton(sq, sk, pos, table)
    sq.copy_((sq.float() @ rot).to(dtype))
    sk.copy_((sk.float() @ rot).to(dtype))
    kv4_write_triton(sep, sk, sv, slots)
    if dtype == torch.float32:  # the product's summation order alone
        ulp = 2.0 ** -23
        assert torch.allclose(qkv, sep_qkv, atol=1e-5, rtol=1e-5)
    else:  # a float32 difference that far down can only flip the final rounding: one ulp
        ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
        assert bool(((qkv.float() - sep_qkv.float()).abs() <= ulp * sep_qkv.float().abs() + 1e-6).all())
    for a, b in zip(cache.tensors(), sep.tensors()):
        if a.dtype == torch.uint8:
            _assert_codes_close(a, b, 0.02)
        else:
            assert float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-9)) < max(4 * ulp, 1e-3)


@pytest.mark.parametrize("kind", ["kv4", "paged"])
def test_identity_rotation_is_the_unrotated_path_bit_for_bit(kind):
    """rotation = I goes through the product (x·I is exact) and must store exactly what rotation=None
    stores: the padded dot tiles, the in-place q, the write. And rotation=None is the plain kernel."""
    t, hq, hk, d, page = 5, 3, 1, 64, 8  # odd head counts: padded to the dot's 16-row tiles
    table, pos, slots, qkv = _rotation_case(t, hq, hk, d, torch.bfloat16, page, seed=2)
    outs = []
    for rot in (None, torch.eye(d, device=DEVICE)):
        x = qkv.clone()
        if kind == "kv4":
            c = KV4Cache.empty(4, hk, page, d, DEVICE)
            rope_cache_write(*_views(x, hq, hk, d), pos, table, slots, kv4=c, rotation=rot)
            outs.append((x, *c.tensors()))
        else:
            kc, vc = (torch.zeros(4, hk, page, d, device=DEVICE, dtype=x.dtype) for _ in range(2))
            rope_cache_write(*_views(x, hq, hk, d), pos, table, slots, k_cache=kc, v_cache=vc, rotation=rot)
            outs.append((x, kc, vc))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_rotation_with_a_16bit_cache():
    """The rotation is not tied to KV4 (the engine uses it with KV4 only): paged 16-bit writes store k·H."""
    from natix.quant.qoq import head_rotation

    t, hq, hk, d, page = 4, 4, 2, 64, 8
    rot = head_rotation(d).float().to(DEVICE)
    table, pos, slots, qkv = _rotation_case(t, hq, hk, d, torch.float32, page, seed=3)
    ref_qkv = qkv.clone()
    kc, vc = (torch.zeros(4, hk, page, d, device=DEVICE) for _ in range(2))
    rkc, rvc = kc.clone(), vc.clone()
    rope_cache_write(*_views(qkv, hq, hk, d), pos, table, slots, k_cache=kc, v_cache=vc, rotation=rot)
    rope_cache_write_reference(*_views(ref_qkv, hq, hk, d), pos, table, slots, k_cache=rkc, v_cache=rvc,
                               rotation=rot)
    for a, b in ((qkv, ref_qkv), (kc, rkc), (vc, rvc)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_rotation_errors():
    t, hq, hk, d = 2, 2, 1, 64
    pos = torch.zeros(t, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(t, dtype=torch.int32, device=DEVICE)

    def call(rot, d=d, fn=rope_cache_write):
        q, k, v = (torch.randn(t, h, d, device=DEVICE) for h in (hq, hk, hk))
        tab = cos_sin_table(torch.rand(d // 2, device=DEVICE), 8)
        fn(q, k, v, pos, tab, slots, kv4=KV4Cache.empty(1, hk, 8, d, DEVICE), rotation=rot)

    with pytest.raises(ValueError, match="float32"):
        call(torch.eye(d, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        call(torch.eye(32, device=DEVICE))
    with pytest.raises(ValueError, match="float32"):
        call(torch.eye(d, device=DEVICE)[None])
    for bad in (16, 48):  # the dot's tiles need D/2 >= 16, a power of two
        with pytest.raises(ValueError, match="power of two"):
            call(torch.eye(bad, device=DEVICE), d=bad)
    with pytest.raises(ValueError, match="contiguous"):
        call(torch.eye(2 * d, device=DEVICE)[::2, ::2])
    call(torch.eye(48, device=DEVICE), d=48, fn=rope_cache_write_reference)  # the reference takes any D


def test_the_hadamard_takes_the_16bit_sign_path():
    """head_rotation(D) for a power-of-two D is c S with S of +-1: the fused kernel then runs its dots
    in the tensors' 16-bit dtype against S (the fp16 cases above run that path; bf16 runs it on GPUs).
    A matrix that is not of that form keeps the float32 dots."""
    from natix.kernels.rope_cache_write import _sign_form
    from natix.quant.qoq import head_rotation

    h = head_rotation(64).float()
    signs, c = _sign_form(h, torch.float16)
    assert c == pytest.approx(1 / 8) and signs.dtype == torch.float16 and torch.equal(signs.float() * c, h)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    assert _sign_form(q.float().contiguous(), torch.float16) is None
