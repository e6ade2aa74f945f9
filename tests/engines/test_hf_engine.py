"""HFEngine on a tiny random Llama: shapes, greedy parity with model.generate, sampling
reproducibility, stops, logprobs, timing, batching."""

from __future__ import annotations

import subprocess
import sys

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine

PROMPTS = ["hello world", "The answer is", "a", "Once upon a time, in a land far away"]


def _engine(model_dir: str, **kw):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=model_dir, device="cpu", **kw))
    return eng


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    yield eng
    eng.close()


def _tokens(res):
    return [[c.token_ids for c in per] for per in res]


def test_import_is_light():
    code = ("import sys, natix.engines, natix.engines.hf_engine, natix.engines.worker, "
            "natix.engines.kv_compression, natix.engines.chat; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_n_completions_shape(engine):
    res = engine.generate(PROMPTS[:3], SamplingSpec(n=3, temperature=1.0, max_tokens=5, seed=0))
    assert len(res) == 3 and all(len(per) == 3 for per in res)
    for per in res:
        for c in per:
            assert 1 <= c.num_tokens <= 5
            assert c.finish_reason in ("stop", "length")
            assert len(c.token_logprobs) == c.num_tokens
            assert all(lp <= 0 for lp in c.token_logprobs)


def test_greedy_matches_model_generate(engine):
    import torch

    spec = SamplingSpec(max_tokens=12)
    res = engine.generate(PROMPTS, spec)
    tok, model = engine.tokenizer, engine.model
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, enc.input_ids.shape[1]:].tolist()
    for per, ref in zip(res, new):
        c = per[0]
        if tok.eos_token_id in ref:  # generate pads after EOS; we stop at it
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert list(c.token_ids) == ref
        assert c.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")


def test_seed_reproducible_and_seeds_differ(engine):
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=16, seed=123)
    a = engine.generate(PROMPTS[:2], spec)
    b = engine.generate(PROMPTS[:2], spec)
    c = engine.generate(PROMPTS[:2], spec.replace(seed=124))
    assert _tokens(a) == _tokens(b)
    assert [x.text for per in a for x in per] == [x.text for per in b for x in per]
    assert _tokens(a) != _tokens(c)


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    greedy = _tokens(engine.generate(PROMPTS, SamplingSpec(max_tokens=10)))
    topk = _tokens(engine.generate(PROMPTS, SamplingSpec(temperature=0.8, top_k=1, max_tokens=10, seed=5)))
    topp = _tokens(engine.generate(PROMPTS, SamplingSpec(temperature=0.8, top_p=1e-6, max_tokens=10, seed=5)))
    assert topk == greedy and topp == greedy


def test_stop_string_truncates(engine):
    base = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=20))[0][0]
    assert len(base.text) >= 8, "fixture model should not hit EOS this early"
    stop = base.text[5:7]
    expect = base.text[: base.text.find(stop)]
    got = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=20, stop=(stop, "never-appears")))[0][0]
    assert got.text == expect
    assert got.finish_reason == "stop"
    assert got.num_tokens < base.num_tokens
    assert got.token_ids == base.token_ids[: got.num_tokens]  # same tokens up to the stop


def test_eos_finishes_with_stop(engine):
    base = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=10))[0][0]
    fake_eos = base.token_ids[3]
    first = base.token_ids.index(fake_eos)
    engine._eos.add(fake_eos)  # as if the generation config listed it as an end-of-turn id
    try:
        got = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=10))[0][0]
    finally:
        engine._eos.discard(fake_eos)
    assert got.token_ids == base.token_ids[: first + 1]
    assert got.finish_reason == "stop"
    assert got.text == engine.tokenizer.decode(base.token_ids[:first])  # EOS not in text


def test_max_tokens_gives_length(engine):
    res = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=3))[0][0]
    assert res.num_tokens == 3 and res.finish_reason == "length"


def test_logprobs_match_teacher_forcing(engine):
    import torch

    res = engine.generate(PROMPTS[:2], SamplingSpec(n=2, temperature=1.0, max_tokens=8, seed=7))
    tok, model = engine.tokenizer, engine.model
    for prompt, per in zip(PROMPTS[:2], res):
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        for c in per:
            ids = torch.tensor([p_ids + list(c.token_ids)])
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1)[len(p_ids) - 1 : -1]
            ref = lp.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(torch.tensor(c.token_logprobs), ref, atol=1e-4)
            assert c.sum_logprob == pytest.approx(float(ref.sum()), abs=1e-3)


def test_timing_positive(engine):
    res = engine.generate(PROMPTS[:2], SamplingSpec(max_tokens=6))
    for per in res:
        t = per[0].timing
        assert t.ttft_s > 0 and t.total_s >= t.ttft_s
        if per[0].num_tokens > 1:
            assert t.decode_s_per_token > 0


def test_batching_boundaries_match_unbatched(engine, tiny_model_dir):
    small = _engine(tiny_model_dir, max_batch_size=2)
    try:
        spec = SamplingSpec(max_tokens=10)
        one_by_one = [engine.generate([p], spec)[0] for p in PROMPTS]
        assert _tokens(small.generate(PROMPTS, spec)) == _tokens(one_by_one)
        assert _tokens(engine.generate(PROMPTS, spec)) == _tokens(one_by_one)
        # n=3 greedy copies split over batches of 2: all identical
        per = small.generate(PROMPTS[:1], SamplingSpec(n=3, max_tokens=10))[0]
        assert len({c.token_ids for c in per}) == 1 and per[0].token_ids == one_by_one[0][0].token_ids
    finally:
        small.close()


def test_logprobs_off(engine):
    c = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=3, logprobs=False))[0][0]
    assert c.token_logprobs is None


@pytest.mark.parametrize("bad", [
    dict(n=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0),
])
def test_bad_sampling_spec_raises(bad):
    with pytest.raises(ValueError):
        SamplingSpec(**bad)


def test_bad_inputs_raise(engine):
    with pytest.raises(TypeError):
        engine.generate("a single string", SamplingSpec())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([""], SamplingSpec())


def test_apply_chat_fallback_and_template(engine):
    from natix.engines.chat import apply_chat

    assert apply_chat(engine.tokenizer, "hi") == "hi"
    assert apply_chat(engine.tokenizer, "hi", system="be brief") == "be brief\n\nhi"
    tok = engine.tokenizer.__class__.from_pretrained(engine.cfg.model)
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert apply_chat(tok, "hi", system="s") == "[system]s[user]hi[assistant]"


def test_adapter_is_merged(engine, tiny_model_dir, tmp_path):
    """A LoRA with non-zero weights changes the outputs; the engine's logprobs equal the
    unmerged peft model's (teacher-forced) on its own greedy tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lora = get_peft_model(base, cfg)
    lora.save_pretrained(tmp_path / "adapter")
    eng = _engine(tiny_model_dir, adapter=str(tmp_path / "adapter"))
    try:
        got = eng.generate(PROMPTS[:1], SamplingSpec(max_tokens=8))[0][0]
    finally:
        eng.close()
    plain = engine.generate(PROMPTS[:1], SamplingSpec(max_tokens=8))[0][0]
    assert got.token_logprobs != plain.token_logprobs
    p_ids = engine.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + list(got.token_ids)])
    with torch.inference_mode():
        lp = torch.log_softmax(lora.eval()(input_ids=ids).logits[0].float(), -1)[len(p_ids) - 1 : -1]
    ref = lp.gather(-1, torch.tensor(got.token_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(got.token_logprobs), ref, atol=1e-4)


def _generate_recording_caches(eng, spec):
    """Generate with ``eng`` and return (results, the caches its batches used)."""
    caches = []
    make = eng._new_cache

    def record():
        caches.append(make())
        return caches[-1]

    eng._new_cache = record
    try:
        return eng.generate(PROMPTS, spec), caches
    finally:
        eng._new_cache = make


def _common_prefix(a, b) -> list[int]:
    """Per completion: how many leading greedy tokens two runs share."""
    out = []
    for pa, pb in zip(_tokens(a), _tokens(b)):
        for ca, cb in zip(pa, pb):
            out.append(next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb))))
    return out


def test_int4_kv_cache_generates_from_quantized_cache(tiny_model_dir):
    """model.natix_kv_cache = "int4" (what the natix loader sets for w4a8kv4): every batch's cache
    is the quantizing one and holds UINT4 rows (re-quantizing them changes nothing), also after the
    engine's preallocate swap and row dropping; greedy stays close to the KV16 run."""
    import torch

    from natix.quant.kv_quant import fake_quant_int4

    eng = _engine(tiny_model_dir)
    try:
        spec = SamplingSpec(max_tokens=12)
        kv16, plain = _generate_recording_caches(eng, spec)
        eng.model.natix_kv_cache = "int4"
        kv4, caches = _generate_recording_caches(eng, spec)
    finally:
        eng.close()
    assert caches and all(type(c).__name__ == "QuantizedKVCache" for c in caches)
    assert all(type(c).__name__ == "DynamicCache" for c in plain)
    for c in caches:
        assert all(type(layer).__name__ == "SlabLayer" for layer in c.layers)  # preallocate still swapped them
        for layer in c.layers:
            assert torch.equal(fake_quant_int4(layer.keys), layer.keys)
            assert torch.equal(fake_quant_int4(layer.values), layer.values)
    assert not torch.equal(fake_quant_int4(plain[0].layers[0].keys), plain[0].layers[0].keys)
    # a random 2-layer model with head_dim 8 has near-ties everywhere, so greedy paths part after a
    # few tokens (measured: shared prefixes 7, 2, 1, 3 of 12); the first token always agrees
    assert min(_common_prefix(kv4, kv16)) >= 1


def test_fp8_kv_cache_with_calibrated_scales(tiny_model_dir):
    import torch

    from natix.quant.kv_quant import calibrate_fp8_kv_scales, register_kv_scales

    eng = _engine(tiny_model_dir)
    try:
        spec = SamplingSpec(max_tokens=12)
        kv16 = eng.generate(PROMPTS, spec)
        model = eng.model
        enc = eng.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)

        def run():
            with torch.inference_mode():
                model(**enc)

        for i, layer in enumerate(model.model.layers):
            register_kv_scales(layer.self_attn, *calibrate_fp8_kv_scales(f"model.layers.{i}", layer, run))
        model.natix_kv_cache = "fp8"
        kv8, caches = _generate_recording_caches(eng, spec)
    finally:
        eng.close()
    assert caches and all(type(c).__name__ == "QuantizedKVCache" and c.natix_kv_mode == "fp8" for c in caches)
    for i, layer in enumerate(caches[0].layers):
        s = model.model.layers[i].self_attn.k_scale.float()
        assert torch.equal((layer.keys / s).to(torch.float8_e4m3fn).float() * s, layer.keys)
    assert min(_common_prefix(kv8, kv16)) >= 1
