"""KV-cache quantization of the reference path: int4 stores exactly the kernel cache's numbers,
survives the engine's preallocate swap; fp8 with calibrated static scales; the cache factory."""

from __future__ import annotations

import math

import pytest
import torch

from natix.kernels.kv4_cache import KV4Cache, dequantize_pages, kv4_write_reference, quantize_rows_reference
from natix.quant.kv_quant import (FP8_MAX, calibrate_fp8_kv_scales, fake_quant_fp8, fake_quant_int4,
                                  fake_quant_int4_rotated, kv_cache_scheme, new_cache, quantize_key_blocks, quantized_cache_class,
                                  register_kv_scales)
from natix.quant.qoq import head_rotation


def _model(tiny, **kw):
    # head_dim 32 (hidden 128 / 4 heads): more dims than UINT4 codes, so "<= 16 distinct values
    # per row" really says the row was quantized
    return tiny.model("llama", hidden=128, **kw)


def _ids(b: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def _run(model, ids, cache):
    import inspect

    # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{kw: cache}).logits


def _plain(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_fake_quant_int4_is_the_kernel_cache(group_size):
    """Quantize-dequantize equals writing the kernel's paged KV4 cache and reading it back."""
    torch.manual_seed(0)
    t, h, d = 6, 2, 32
    k, v = torch.randn(t, h, d) * 3, torch.randn(t, h, d)
    cache = KV4Cache.empty(num_pages=2, num_kv_heads=h, page_size=4, head_dim=d, group_size=group_size)
    ng = cache.num_groups
    kv4_write_reference(cache, k, v, torch.arange(t))
    kd = dequantize_pages(cache.k, cache.k_scale, cache.k_zero).permute(0, 2, 1, 3).reshape(-1, h, d)[:t]
    vd = dequantize_pages(cache.v, cache.v_scale, cache.v_zero).permute(0, 2, 1, 3).reshape(-1, h, d)[:t]
    assert torch.equal(fake_quant_int4(k, ng), kd) and torch.equal(fake_quant_int4(v, ng), vd)
    assert fake_quant_int4(k.half(), ng).dtype == torch.float16
    q, s, _ = quantize_rows_reference(k, ng)
    assert s.shape == (t, h, ng)
    # every group spans its own 0..15: the groups are quantized separately
    qg = q.reshape(t, h, ng, d // ng)
    assert bool((qg.amax(-1) == 15).all()) and bool((qg.amin(-1) == 0).all())


def test_kv_groups_and_the_cache_format_checks():
    from natix.kernels.kv4_cache import kv_groups, num_groups

    assert [kv_groups(128, g) for g in (-1, 16, 32, 64, 128)] == [1, 8, 4, 2, 1]
    assert kv_groups(64, 32) == 2 and kv_groups(32, 32) == 1 and kv_groups(32, 16) == 2
    assert kv_groups(16, 32) == 1 and kv_groups(96, 32) == 6 and kv_groups(80, 32) == 1  # 40 = 8 * 5: no group >= 16
    assert num_groups(64, -1) == num_groups(64, 64) == 1 and num_groups(64, 16) == 4
    for bad in (8, 24, 64 + 32, 128):
        with pytest.raises(ValueError, match="KV4 group size"):
            num_groups(64, bad)


def test_new_cache_modes(tiny):
    model = _model(tiny)
    assert new_cache(model) is None
    model.natix_kv_cache = "none"
    assert new_cache(model) is None
    model.natix_kv_cache = "int4"
    c = new_cache(model)
    assert isinstance(c, quantized_cache_class()) and c.natix_kv_mode == "int4" and c.natix_kv_groups == 1
    model.natix_kv_group_size = 16  # head_dim 32: two groups
    assert new_cache(model).natix_kv_groups == 2
    model.natix_kv_cache = "fp8"
    with pytest.raises(ValueError, match="k_scale/v_scale"):
        new_cache(model)
    model.natix_kv_cache = "int8"
    with pytest.raises(ValueError, match="natix_kv_cache"):
        new_cache(model)


def test_int4_cache_stores_quantized_keys_and_values(tiny):
    from natix.engines.kv_cache import preallocate

    model = _model(tiny)
    model.natix_kv_cache = "int4"
    ids, nxt = _ids(), _ids(t=1, seed=1)
    plain, quant = _plain(model), new_cache(model)
    ref_logits = _run(model, ids, plain)
    logits = _run(model, ids, quant)
    # layer 0's inputs do not depend on the cache: its stored (post-RoPE) keys/values are exactly
    # the kernel quantization of the float ones
    assert torch.equal(quant.layers[0].keys, fake_quant_int4(plain.layers[0].keys))
    assert torch.equal(quant.layers[0].values, fake_quant_int4(plain.layers[0].values))
    assert not torch.equal(quant.layers[0].keys, plain.layers[0].keys)
    # the engine swaps the layers for in-place slab layers after prefill: quantization must go on
    assert preallocate(quant, 4) and preallocate(plain, 4)
    assert type(quant.layers[0]).__name__ == "SlabLayer"
    _run(model, nxt, plain)
    _run(model, nxt, quant)
    assert quant.get_seq_length() == 11
    assert torch.equal(quant.layers[0].keys, fake_quant_int4(plain.layers[0].keys))
    for layer in quant.layers:
        rows = torch.cat([layer.keys, layer.values]).reshape(-1, 32)
        assert max(len(r.unique()) for r in rows) <= 16  # UINT4: at most 16 values per (token, head)
        assert torch.equal(fake_quant_int4(layer.keys), layer.keys)  # re-quantizing is the identity
    # KV4 on a tiny random model: the logits move, but little
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert 0 < rel < 0.1, rel


def test_unquantized_prefill_attends_16_bit_and_stores_quantized(tiny):
    """prefill="unquantized" (the natix engine's and QServe's prefill): the prompt's logits are the
    unquantized model's, the cache holds quantized rows (layer 0's identical to prefill="quantized"'s),
    and they stay quantized through the next decode step."""
    model = _model(tiny)
    model.natix_kv_cache = "int4"
    ids, nxt = _ids(), _ids(t=1, seed=1)
    plain, raw, quant = _plain(model), new_cache(model, prefill="unquantized"), new_cache(model)
    assert (raw.natix_prefill, quant.natix_prefill) == ("unquantized", "quantized")
    ref_logits, raw_logits, quant_logits = _run(model, ids, plain), _run(model, ids, raw), _run(model, ids, quant)
    assert torch.equal(raw_logits, ref_logits) and not torch.equal(quant_logits, ref_logits)
    # layer 0's stored rows do not depend on the attention above them: identical in both modes
    assert torch.equal(raw.layers[0].keys, quant.layers[0].keys)
    assert torch.equal(raw.layers[0].keys, fake_quant_int4(plain.layers[0].keys))
    # deeper layers' inputs differ (16-bit prompt attention below them), so only layer 0 is compared;
    # the decode step reads every stored row quantized
    step_raw = _run(model, nxt, raw)
    for layer in raw.layers:
        assert torch.equal(fake_quant_int4(layer.keys), layer.keys)
    assert raw.get_seq_length() == 11 and step_raw.shape == (2, 1, ref_logits.shape[-1])
    with pytest.raises(ValueError, match="prefill must be one of"):
        new_cache(model, prefill="fp16")


def test_key_rotation_keeps_scores_and_stores_rotated_codes():
    """q·H·(k·H)ᵀ = q·kᵀ in fp32; the reference's Q(kH)·Hᵀ read with q gives the engine's scores
    (q·H)·Q(kH)ᵀ; and a key with one loud channel loses far less to KV4 when rotated."""
    g = torch.Generator().manual_seed(0)
    d = 32
    h = head_rotation(d).float()
    q, k = torch.randn(5, 3, d, generator=g), torch.randn(7, 3, d, generator=g)
    k[..., 3] *= 30.0
    s = torch.einsum("qhd,khd->hqk", q, k)
    assert ((torch.einsum("qhd,khd->hqk", q @ h, k @ h) - s).norm() / s.norm()).item() < 1e-6
    kq = fake_quant_int4(k @ h)  # what the engine stores and reads
    engine = torch.einsum("qhd,khd->hqk", q @ h, kq)
    ref = torch.einsum("qhd,khd->hqk", q, fake_quant_int4_rotated(k, h))
    assert ((ref - engine).norm() / engine.norm()).item() < 1e-6
    err_plain = (torch.einsum("qhd,khd->hqk", q, fake_quant_int4(k)) - s).norm() / s.norm()
    err_rot = (engine - s).norm() / s.norm()
    assert err_rot < 0.5 * err_plain, (err_rot, err_plain)


def test_rotated_key_cache(tiny):
    """model.natix_kv_rotate_keys (the loader's, from rotate_keys): the int4 cache stores Q(kH)Hᵀ for
    keys (layer 0: exactly), values as before; without a KV4 cache there is nothing to rotate."""
    model = _model(tiny)
    model.natix_kv_cache, model.natix_kv_rotate_keys = "int4", True
    ids = _ids()
    plain, rot = _plain(model), new_cache(model)
    h = head_rotation(32).float()
    assert torch.equal(rot.natix_key_rotation, h)
    assert new_cache(model, prefill="unquantized").natix_key_rotation is not None
    _run(model, ids, plain)
    _run(model, ids, rot)
    assert torch.equal(rot.layers[0].keys, fake_quant_int4_rotated(plain.layers[0].keys, h))
    assert torch.equal(rot.layers[0].values, fake_quant_int4(plain.layers[0].values))
    assert not torch.equal(rot.layers[0].keys, fake_quant_int4(plain.layers[0].keys))
    model.natix_kv_rotate_keys = False
    assert new_cache(model).natix_key_rotation is None
    model.natix_kv_cache, model.natix_kv_rotate_keys = "none", True
    assert new_cache(model) is None


def test_fp8_calibrated_scales_and_cache(tiny):
    model = _model(tiny)
    ids = _ids(b=3, t=16, seed=2)
    plain = _plain(model)
    ref_logits = _run(model, ids, plain)
    pre_amax = {}

    def grab(i):
        def hook(_m, _i, out):
            pre_amax[i] = out.detach().abs().amax().item()
        return hook

    handles = [layer.self_attn.k_proj.register_forward_hook(grab(i)) for i, layer in enumerate(model.model.layers)]
    _run(model, ids, None)
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        ks, vs = calibrate_fp8_kv_scales(f"model.layers.{i}", layer, lambda: _run(model, ids, None))
        post_k = plain.layers[i].keys.abs().amax().item()
        # a safe bound on the post-RoPE keys, at most sqrt(2) looser than the pre-RoPE amax
        assert post_k <= ks * FP8_MAX * (1 + 1e-6) <= math.sqrt(2) * pre_amax[i] * (1 + 1e-6)
        assert vs * FP8_MAX == pytest.approx(plain.layers[i].values.abs().amax().item(), rel=1e-6)
        register_kv_scales(layer.self_attn, ks, vs)
    sd = model.state_dict()
    assert sd["model.layers.1.self_attn.k_scale"].dtype == torch.float32
    assert sd["model.layers.1.self_attn.v_scale"].shape == (1,)

    model.natix_kv_cache = "fp8"
    cache = new_cache(model)
    logits = _run(model, ids, cache)
    ks0 = model.model.layers[0].self_attn.k_scale
    assert torch.equal(cache.layers[0].keys, fake_quant_fp8(plain.layers[0].keys, ks0))
    for i, layer in enumerate(cache.layers):
        vs = model.model.layers[i].self_attn.v_scale.float()
        # every stored value is an e4m3 number times the layer's scale
        v8 = (layer.values.float() / vs).to(torch.float8_e4m3fn).float() * vs
        assert torch.equal(v8, layer.values)
    assert not torch.equal(cache.layers[0].keys, plain.layers[0].keys)
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert 0 < rel < 0.05, rel


def test_register_kv_scales_replaces():
    attn = torch.nn.Linear(2, 2)
    register_kv_scales(attn, 0.5, torch.tensor(0.25))
    register_kv_scales(attn, 1.0, 2.0)
    assert attn.k_scale.tolist() == [1.0] and attn.v_scale.tolist() == [2.0]
    assert set(attn.state_dict()) == {"weight", "bias", "k_scale", "v_scale"}


def test_kv_cache_scheme_is_valid_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    s = kv_cache_scheme()
    assert {k: s[k] for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")} == \
           {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float", strategy="channel"))},
        kv_cache_scheme=QuantizationArgs(**s))
    assert qc.model_dump(mode="json")["kv_cache_scheme"]["strategy"] == "tensor"


def test_quantize_key_blocks_per_channel_over_complete_blocks():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 11, 8)
    k = keys.clone()
    assert quantize_key_blocks(k, 0, 4) == 8
    for b0 in (0, 4):  # each complete block: every (head, channel) one UINT4 range over its 4 tokens
        blk = keys[:, :, b0:b0 + 4]
        assert torch.equal(k[:, :, b0:b0 + 4], fake_quant_int4(blk.transpose(-1, -2), 1).transpose(-1, -2))
    assert torch.equal(k[:, :, 8:], keys[:, :, 8:])  # the incomplete block stays as written
    again = k.clone()
    assert quantize_key_blocks(again, 8, 4) == 8 and torch.equal(again, k)  # done blocks are not re-quantized
    assert quantize_key_blocks(k[:, :, :6], 8, 4) == 4  # a cache cropped below the done count


@pytest.mark.parametrize("prefill", ["quantized", "unquantized"])
def test_int4_cache_with_per_channel_key_blocks(tiny, prefill):
    """kv_key_block: keys stay 16-bit until their block of tokens is complete, then are quantized per
    channel over the block; values per token as always; prefill attention reads what ``prefill`` says."""
    from natix.engines.kv_cache import preallocate

    model = _model(tiny)
    model.natix_kv_cache, model.natix_kv_key_block = "int4", 4
    ids = _ids(t=6)
    plain, c = _plain(model), new_cache(model, prefill=prefill)
    assert c.natix_key_block == 4
    ref = _run(model, ids, plain)
    out = _run(model, ids, c)
    k0 = plain.layers[0].keys  # layer 0's keys do not depend on the cache
    assert torch.equal(c.layers[0].keys[:, :, 4:], k0[:, :, 4:])
    assert torch.equal(c.layers[0].keys[:, :, :4], fake_quant_int4(k0[:, :, :4].transpose(-1, -2), 1).transpose(-1, -2))
    assert torch.equal(c.layers[0].values, fake_quant_int4(plain.layers[0].values))
    assert torch.equal(out, ref) == (prefill == "unquantized")
    # two decode steps complete the second block (tokens 4..7), in the engine's in-place slab layers too
    assert preallocate(c, 4) and preallocate(plain, 4)
    for s in (1, 2):
        nxt = _ids(t=1, seed=s)
        _run(model, nxt, plain)
        _run(model, nxt, c)
    k0 = plain.layers[0].keys
    assert torch.equal(c.layers[0].keys[:, :, 4:8], fake_quant_int4(k0[:, :, 4:8].transpose(-1, -2), 1).transpose(-1, -2))
    assert c.natix_key_blocks_done[0] == 8
