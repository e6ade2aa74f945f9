"""The natix engine on CPU (reference ops) against the hf engine, and its serving behaviour:
continuous batching, n samples sharing a prefill, preemption, prefix caching, streaming, errors."""
from __future__ import annotations

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine
from natix.engines.streaming import RequestError, StreamingEngine

PROMPTS = ["hello world", "The quick brown fox", "a", "xyz xyz xyz xyz", "0123456789" * 3]


def _tokens(res):
    return [[c.token_ids for c in per] for per in res]


@pytest.fixture(scope="module")
def hf_results(tiny_arch_dirs):
    out = {}
    for arch, d in tiny_arch_dirs.items():
        e = create_engine("hf")
        e.load(EngineConfig(model=str(d)))
        out[arch] = e.generate(PROMPTS, SamplingSpec(max_tokens=24))
        e.close()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_hf_engine(arch, tiny_arch_dirs, hf_results, natix_factory):
    nx = natix_factory(tiny_arch_dirs[arch], page_size=8, num_kv_pages=64)
    got = nx.generate(PROMPTS, SamplingSpec(max_tokens=24))
    ref = hf_results[arch]
    assert _tokens(got) == _tokens(ref)
    for g, r in zip(got, ref):
        assert g[0].text == r[0].text and g[0].finish_reason == r[0].finish_reason
        assert max(abs(a - b) for a, b in zip(g[0].token_logprobs, r[0].token_logprobs)) < 1e-4
        assert g[0].timing.ttft_s > 0 and g[0].timing.total_s >= g[0].timing.ttft_s


def test_is_a_streaming_engine(tiny_arch_dirs, natix_factory):
    assert isinstance(natix_factory(tiny_arch_dirs["llama"], num_kv_pages=16), StreamingEngine)


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_n_samples_share_one_prefill_and_seeds_are_batch_invariant(asy, tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, page_size=8, num_kv_pages=128)
    spec = SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=7)
    before = nx.stats().prompt_tokens
    res = nx.generate(PROMPTS[:1], spec)
    n_prompt = len(nx.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids)
    assert nx.stats().prompt_tokens - before == n_prompt  # one prefill for the four samples
    samples = [c.token_ids for c in res[0]]
    assert len(samples) == 4 and len(set(samples)) > 1
    # the same request inside a different batch, and alone again: the same tokens
    mixed = nx.generate([PROMPTS[3], PROMPTS[0], PROMPTS[1]], spec)
    assert [c.token_ids for c in mixed[1]] == samples
    assert _tokens(nx.generate(PROMPTS[:1], spec)) == [samples]
    assert _tokens(nx.generate(PROMPTS[:1], spec.replace(seed=8))) != [samples]
    assert nx.scheduler.blocks.usage() == 0.0  # every page back


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], num_kv_pages=64, page_size=8)
    greedy = _tokens(nx.generate(PROMPTS, SamplingSpec(max_tokens=10)))
    assert _tokens(nx.generate(PROMPTS, SamplingSpec(temperature=0.9, top_k=1, max_tokens=10, seed=1))) == greedy
    assert _tokens(nx.generate(PROMPTS, SamplingSpec(temperature=0.9, top_p=1e-6, max_tokens=10, seed=1))) == greedy


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_stop_strings_cut_text_and_streaming_never_shows_them(asy, tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=8)
    base = nx.generate(PROMPTS[:1], SamplingSpec(max_tokens=20))[0][0]
    stop = base.text[6:9]
    assert len(stop) == 3
    got = nx.generate(PROMPTS[:1], SamplingSpec(max_tokens=20, stop=(stop, "never")))[0][0]
    assert got.finish_reason == "stop" and got.text == base.text[: base.text.find(stop)]
    assert got.token_ids == base.token_ids[: len(got.token_ids)] and len(got.token_ids) < len(base.token_ids)
    rid = nx.add_request(PROMPTS[0], SamplingSpec(max_tokens=20, stop=(stop,)))
    text, final = "", None
    while nx.has_unfinished():
        for d in nx.step():
            assert d.request_id == rid
            text += d.text
            assert stop not in text
            final = d if d.finished else final
    assert final is not None and final.completion.text == text == got.text


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_streaming_deltas_add_up_and_requests_join_and_leave(asy, tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=8)
    # three prompts that run to their max_tokens (no early EOS from this random model)
    p0, p1, p2 = PROMPTS[0], PROMPTS[3], "zzz"
    solo = {p: nx.generate([p], SamplingSpec(max_tokens=m))[0][0] for p, m in ((p0, 15), (p1, 5), (p2, 9))}
    assert all(c.finish_reason == "length" for c in solo.values())
    a = nx.add_request(p0, SamplingSpec(max_tokens=15))
    toks = {a: [], "b": [], "c": []}
    texts = {a: "", "b": "", "c": ""}
    finals = {}
    running = []
    step = 0
    while nx.has_unfinished():
        if step == 2:
            nx.add_request(p1, SamplingSpec(max_tokens=5), request_id="b")
        if step == 4:
            nx.add_request(p2, SamplingSpec(max_tokens=9), request_id="c")
        for d in nx.step():
            toks[d.request_id] += d.token_ids
            texts[d.request_id] += d.text
            if d.finished:
                finals[d.request_id] = d.completion
        running.append(nx.stats().running)
        step += 1
    for rid, p in ((a, p0), ("b", p1), ("c", p2)):
        assert tuple(toks[rid]) == finals[rid].token_ids == solo[p].token_ids
        assert texts[rid] == finals[rid].text == solo[p].text
    assert max(running) == 3 and running[-1] == 0, running  # all three ran together, then left


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_abort_frees_pages_and_others_go_on(asy, tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=8)
    keep = nx.add_request("zzz", SamplingSpec(max_tokens=10))
    drop = nx.add_request(PROMPTS[0], SamplingSpec(n=3, temperature=1.0, max_tokens=30))
    reasons = {}
    for i in range(10**6):
        if i == 2:
            nx.abort(drop)
            nx.abort("no-such-request")  # ignored
        if not nx.has_unfinished():
            break
        for d in nx.step():
            if d.finished:
                reasons[(d.request_id, d.index)] = d.finish_reason
    assert reasons.pop((keep, 0)) == "length"
    # every sample of the aborted request finished: by abort, unless it had already stopped by itself
    assert sorted(reasons) == [(drop, 0), (drop, 1), (drop, 2)]
    assert "abort" in reasons.values() and set(reasons.values()) <= {"abort", "stop"}
    assert nx.scheduler.blocks.usage() == 0.0


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_request_errors_are_per_request(asy, tiny_arch_dirs, natix_factory):
    nx = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=9, page_size=8, max_model_len=64, max_num_seqs=4)
    ok = nx.add_request(PROMPTS[0], SamplingSpec(max_tokens=8))
    with pytest.raises(RequestError, match="max_model_len"):
        nx.add_request("x" * 60, SamplingSpec(max_tokens=8))
    with pytest.raises(RequestError, match="max_num_seqs"):
        nx.add_request(PROMPTS[0], SamplingSpec(n=5, temperature=1.0, max_tokens=4))
    with pytest.raises(RequestError, match="KV pages"):
        nx.add_request(PROMPTS[0], SamplingSpec(n=4, temperature=1.0, max_tokens=40))
    with pytest.raises(RequestError, match="empty"):
        nx.add_request("", SamplingSpec(max_tokens=4))
    with pytest.raises(RequestError, match="token ids"):
        nx.add_request([1, 10**9], SamplingSpec(max_tokens=4))
    with pytest.raises(RequestError, match="already in use"):
        nx.add_request(PROMPTS[1], SamplingSpec(max_tokens=4), request_id=ok)
    done = []
    while nx.has_unfinished():
        done += [d for d in nx.step() if d.finished]
    assert [(d.request_id, d.finish_reason) for d in done] == [(ok, "length")]
    with pytest.raises(ValueError, match="prompt 1"):
        nx.generate([PROMPTS[0], "x" * 60], SamplingSpec(max_tokens=8))
    assert not nx.has_unfinished()  # the refused batch left nothing queued


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_preemption_recomputes_and_loses_nothing(asy, tiny_arch_dirs, natix_factory):
    big = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=256, page_size=4)
    small = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=20, page_size=4)  # 19 usable pages = 76 tokens
    prompts = PROMPTS * 2
    spec = SamplingSpec(max_tokens=24)
    want = _tokens(big.generate(prompts, spec))
    assert _tokens(small.generate(prompts, spec)) == want
    assert small.stats().preemptions > 0 and big.stats().preemptions == 0
    sampled = SamplingSpec(n=2, temperature=1.0, max_tokens=24, seed=3)
    assert _tokens(small.generate(prompts[:4], sampled)) == _tokens(big.generate(prompts[:4], sampled))
    assert small.scheduler.blocks.usage() == 0.0


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_prefix_caching_reuses_pages_with_identical_results(asy, tiny_arch_dirs, natix_factory):
    on = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=4)
    off = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=4, enable_prefix_caching=False)
    shared = "system: be brief. " * 2
    prompts = [shared + "one", shared + "two", shared + "three"]
    spec = SamplingSpec(max_tokens=12)
    first = _tokens(on.generate(prompts[:1], spec))
    hits0 = on.stats().prefix_cache_hit_tokens
    rest = _tokens(on.generate(prompts, spec))
    assert on.stats().prefix_cache_hit_tokens - hits0 >= 3 * 32  # the 36-char prefix: 9 full pages each
    assert rest[0] == first[0]
    assert rest == _tokens(off.generate(prompts, spec)) and off.stats().prefix_cache_hit_tokens == 0


def test_async_scheduling_computes_what_sync_does(tiny_arch_dirs, natix_factory):
    """Async scheduling (decode step N+1 launched before step N's tokens are read, its inputs taken
    from step N's result on the device) gives the same completions as the synchronous loop on a mixed
    workload: greedy and seeded samples (top-p and plain in one batch), n=3, stop strings that end sequences early (their in-flight
    token is dropped), different max_tokens, requests joining mid-run; and it did run ahead."""
    sync = natix_factory(tiny_arch_dirs["llama"], num_kv_pages=64, page_size=4)
    asy = natix_factory(tiny_arch_dirs["llama"], num_kv_pages=64, page_size=4, async_scheduling=True)
    base = sync.generate(PROMPTS[:1], SamplingSpec(max_tokens=20))[0][0]
    stop = base.text[5:7]
    work = [(PROMPTS[0], SamplingSpec(max_tokens=20, stop=(stop,))), (PROMPTS[1], SamplingSpec(max_tokens=7)),
            (PROMPTS[2], SamplingSpec(n=3, temperature=1.0, max_tokens=16, seed=11, logprobs=True)),
            ("zzz", SamplingSpec(temperature=0.8, top_p=0.9, max_tokens=13, seed=2))]

    def run(e):
        out, step = {}, 0
        pending = list(enumerate(work))
        while pending or e.has_unfinished():
            if pending and step % 3 == 0:
                i, (p, sp) = pending.pop(0)
                e.add_request(p, sp, request_id=str(i))
            for d in e.step():
                if d.finished:
                    c = d.completion
                    out[d.request_id, d.index] = (c.text, c.token_ids, c.token_logprobs, c.finish_reason)
            step += 1
        return out

    ahead = asy.steps_ahead
    want, got = run(sync), run(asy)
    # the two runs batch requests differently (a request joins one step later under async), so
    # logprobs may differ in the last bits; tokens, texts and reasons must not
    assert {k: (v[0], v[1], v[3]) for k, v in got.items()} == {k: (v[0], v[1], v[3]) for k, v in want.items()}
    assert all(max(abs(a - b) for a, b in zip(got[k][2], want[k][2])) < 1e-4 for k in want if want[k][2])
    assert want["0", 0][3] == "stop" and len(want["0", 0][1]) < 20
    assert asy.steps_ahead > ahead and asy.info()["async_scheduling"] is True
    assert asy._pending is None and asy.scheduler.blocks.usage() == 0.0


def test_bad_options_and_architectures(tiny_arch_dirs, tmp_path):
    from natix.engines.natix.spec import EngineLoadError

    e = create_engine("natix")
    with pytest.raises(EngineLoadError, match="page_size"):
        e.load(EngineConfig(model=str(tiny_arch_dirs["llama"]), extra={"page_size": 6}))
    with pytest.raises(EngineLoadError, match="kv_cache"):
        e.load(EngineConfig(model=str(tiny_arch_dirs["llama"]), extra={"kv_cache": "fp4"}))
    with pytest.raises(EngineLoadError, match="max_position"):
        e.load(EngineConfig(model=str(tiny_arch_dirs["llama"]), extra={"max_model_len": 10**6}))
    with pytest.raises(EngineLoadError, match="fewer than one sequence"):
        e.load(EngineConfig(model=str(tiny_arch_dirs["llama"]), extra={"kv_cache_memory_gb": 1e-5}))
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(d)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_arch_dirs["llama"]).save_pretrained(d)
    with pytest.raises(EngineLoadError, match="Llama family"):
        e.load(EngineConfig(model=str(d)))


@pytest.mark.parametrize("asy", [False, True], ids=["sync", "async"])
def test_top_logprobs_match_hf(asy, tiny_arch_dirs, natix_factory):
    hf = create_engine("hf")
    hf.load(EngineConfig(model=str(tiny_arch_dirs["llama"])))
    spec = SamplingSpec(max_tokens=6, top_logprobs=3)
    ref = hf.generate(PROMPTS[:2], spec)
    hf.close()
    got = natix_factory(tiny_arch_dirs["llama"], async_scheduling=asy, num_kv_pages=64, page_size=8).generate(PROMPTS[:2], spec)
    for g, r in zip(got, ref):
        assert g[0].top_logprobs is not None and len(g[0].top_logprobs) == g[0].num_tokens
        for a, b in zip(g[0].top_logprobs, r[0].top_logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_dummy_load_format_random_weights_of_the_config_shape(tiny_arch_dirs, natix_factory, tmp_path):
    """load_format=dummy-*: random weights of config.json's shape in the scheme's layout (vLLM's
    --load-format dummy), the directory's tokenizer; the rotary tables are the real model's."""
    import shutil

    from natix.engines.natix.spec import EngineLoadError

    real = natix_factory(tiny_arch_dirs["llama"], num_kv_pages=32)
    for fmt, scheme in (("dummy", "dense"), ("dummy-w4a8kv4", "w4a8kv4")):
        # head_dim 16 is below the KV4 kernels' minimum: W4A8 linears over a 16-bit cache
        nx = natix_factory(tiny_arch_dirs["llama"], load_format=fmt, num_kv_pages=32, kv_cache="none")
        assert nx.weights_scheme == scheme and nx.info()["load_format"] == fmt
        assert nx.runner.spec == real.runner.spec
        cs, real_cs = nx.runner.model.cos_sin, real.runner.model.cos_sin
        assert all((a == b).all() for a, b in zip(cs, real_cs)) if isinstance(cs, tuple) else (cs == real_cs).all()
        out = nx.generate(PROMPTS[:2], SamplingSpec(max_tokens=6))
        assert all(1 <= len(c[0].token_ids) <= 6 and isinstance(c[0].text, str) for c in out)
    # a config alone (no tokenizer): prompts are token ids
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_arch_dirs["llama"] / "config.json", bare / "config.json")
    nx = natix_factory(bare, load_format="dummy-fp8", num_kv_pages=32)
    assert nx.tokenizer is None and 1 <= len(nx.generate([[1, 2, 3]], SamplingSpec(max_tokens=3))[0][0].token_ids) <= 3
    e = create_engine("natix")
    with pytest.raises(EngineLoadError, match="load_format must be one of"):
        e.load(EngineConfig(model=str(bare), extra={"load_format": "random"}))
    with pytest.raises(EngineLoadError, match="adapter"):
        e.load(EngineConfig(model=str(bare), adapter=str(tmp_path), extra={"load_format": "dummy"}))
    with pytest.raises(EngineLoadError, match="config.json"):
        e.load(EngineConfig(model=str(tmp_path / "nowhere"), extra={"load_format": "dummy"}))


@pytest.fixture(scope="module")
def kv4_rotation_artifacts(tiny_llama_builder, tmp_path_factory):
    """w4a8kv4 artifacts (RTN, fp32) of one tiny Llama (hidden 128, head_dim 32, GQA 4/2): values
    rotated; values and keys rotated (both with two KV4 groups of 16 channels a head); values rotated
    with one KV4 scale per head (kv_group_size -1). Their weights are the same: rotate_keys and
    kv_group_size are runtime options."""
    from natix.quant.export import export
    from natix.quant.w4a8kv4_config import W4A8KV4Config

    root = tmp_path_factory.mktemp("natix-kv4-rotation")
    base = tiny_llama_builder(root / "base", hidden=128, max_positions=256)
    out = {}
    for name, keys, kv_group in (("vrot", False, 16), ("kvrot", True, 16), ("vrot-head", False, -1)):
        cfg = W4A8KV4Config(gptq=False, rotate_values=True, rotate_keys=keys, kv_group_size=kv_group)
        out[name] = export(str(base), cfg, root / name, dtype="fp32", calib="pydoc", calib_samples=4,
                           calib_max_length=64).out
    return out


@pytest.mark.parametrize("prefill", ["quantized", "unquantized"])
def test_rotate_keys_matches_the_reference_path(prefill, kv4_rotation_artifacts, natix_factory):
    """A w4a8kv4 artifact with rotate_keys: the natix engine on CPU (RoPE, q·H and k·H, KV4 write of
    the rotated keys) generates what the hf engine's reference cache (Q(kH)·Hᵀ) does; the flag comes
    from the manifest on both, and it changes the result (same weights without it). Measured: the two
    engines' logprobs agree to ~1e-6 per token, except isolated tokens (3 of 77 in one case, 5e-2 nat)
    where a 1e-7 difference moves one INT8 activation code, as in tests/integration; the tokens agree."""
    spec = SamplingSpec(max_tokens=16)
    out = {}
    for name, art in kv4_rotation_artifacts.items():
        nx = natix_factory(art, page_size=8, num_kv_pages=64, prefill_attention=prefill)
        assert (nx.runner.model.key_rotation is not None) == (name == "kvrot")
        assert nx.info()["kv_cache"] == "int4" and nx.info()["kv_groups"] == (1 if name == "vrot-head" else 2)
        out[name, "natix"] = nx.generate(PROMPTS, spec)
        e = create_engine("hf")
        e.load(EngineConfig(model=str(art), extra={"prefill_attention": prefill}))
        assert e.model.natix_kv_rotate_keys == (name == "kvrot")
        out[name, "hf"] = e.generate(PROMPTS, spec)
        e.close()
    for name in kv4_rotation_artifacts:
        got, ref = out[name, "natix"], out[name, "hf"]
        assert _tokens(got) == _tokens(ref), name
        gaps = sorted(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g[0].token_logprobs, r[0].token_logprobs))
        assert gaps[len(gaps) // 2] < 1e-5 and sum(x > 1e-4 for x in gaps) <= 0.1 * len(gaps), (name, gaps[-8:])
        assert gaps[-1] < 0.2, (name, gaps[-1])
    for other in ("kvrot", "vrot-head"):  # each option changes what the cache holds
        moved = max(abs(a - b) for g, r in zip(out[other, "hf"], out["vrot", "hf"])
                    for a, b in zip(g[0].token_logprobs, r[0].token_logprobs))
        assert moved > 1e-3, (other, moved)


def test_per_channel_key_blocks_run_on_hf_and_are_refused_by_natix(kv4_rotation_artifacts, tiny_llama_builder,
                                                                   tmp_path, natix_factory):
    """kv_key_block (keys per channel over blocks of tokens): the hf engine's reference cache serves it,
    reading the option from the manifest, and it changes the result against the same weights with keys per
    token; the natix engine refuses the artifact at load, naming the option (its kernels do not read it yet)."""
    from natix.engines.natix.spec import EngineLoadError
    from natix.quant.export import export
    from natix.quant.w4a8kv4_config import W4A8KV4Config

    base = tiny_llama_builder(tmp_path / "base", hidden=128, max_positions=256)
    art = export(str(base), W4A8KV4Config(gptq=False, rotate_values=True, kv_key_block=16), tmp_path / "kb",
                 dtype="fp32", calib="pydoc", calib_samples=4, calib_max_length=64).out
    with pytest.raises(EngineLoadError, match="kv_key_block"):
        natix_factory(art, page_size=8, num_kv_pages=64)
    spec = SamplingSpec(max_tokens=24)
    out = {}
    for name, path in (("blocks", art), ("tokens", kv4_rotation_artifacts["vrot-head"])):
        e = create_engine("hf")
        e.load(EngineConfig(model=str(path)))
        assert e.model.natix_kv_key_block == e.info()["kv_key_block"] == (16 if name == "blocks" else 0)
        out[name] = e.generate(PROMPTS, spec)
        e.close()
    moved = max(abs(a - b) for g, r in zip(out["blocks"], out["tokens"])
                for a, b in zip(g[0].token_logprobs, r[0].token_logprobs))
    assert moved > 1e-3, moved


_GPU_BRANCH = r"""
import types, torch
from natix.engines.natix.model import DecoderModel
from natix.kernels.kv4_cache import KV4Cache
from natix.kernels.rope import cos_sin_table
from natix.quant.qoq import head_rotation
g = torch.Generator().manual_seed(0)
t, hq, hk, d = 6, 4, 2, 32
q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hk, hk))
k[..., 5] *= 20
pos = torch.tensor([0, 1, 2, 3, 7, 9])
slots = torch.tensor([0, 1, 2, 3, 12, -1])
cs = cos_sin_table(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), 64)
import natix.kernels.rope_cache_write as rcw
launches = []
rcw._kernel.cache_clear()
rcw._launcher.cache_clear()
kern = rcw._kernel()
class Counting:  # the launcher indexes the jitted kernel by its grid: count those launches
    def __getitem__(self, grid):
        launches.append(grid)
        return kern[grid]
rcw._kernel = lambda: Counting()
import natix.kernels.kv4_cache as kv4m, natix.kernels.rope as ropem
def unused(*a, **kw):
    raise AssertionError("the separate rope / KV4 write kernels are not the rotate_keys path any more")
ropem.rope_triton = kv4m.kv4_write_triton = unused
out = {}
for gpu in (False, True):
    fake = types.SimpleNamespace(ops=types.SimpleNamespace(gpu=gpu), key_rotation=head_rotation(d).float(), cos_sin=cs)
    c = KV4Cache.empty(4, hk, 8, d)
    kv = types.SimpleNamespace(layer_caches=[c], kind="int4")
    qq, kk = q.clone(), k.clone()
    DecoderModel._rope_write(fake, kv, 0, qq, kk, v, types.SimpleNamespace(positions=pos, slots=slots))
    out[gpu] = (qq, kk, c)
assert launches == [(t,)], launches  # the CUDA branch: one fused launch, none on the CPU branch
(q0, k0, c0), (q1, k1, c1) = out[False], out[True]
assert torch.allclose(q0, q1, atol=1e-5) and torch.allclose(k0, k1, atol=1e-5)
for a, b in zip(c0.tensors(), c1.tensors()):
    assert (a.float() - b.float()).abs().max() <= (1 if a.dtype == torch.uint8 else 1e-3), (a.dtype,)
print("ok")
"""


def test_rotate_keys_gpu_branch_in_the_triton_interpreter():
    """The CUDA branch of the key rotation (one rope_cache_write launch: RoPE, q·H and k·H, the KV4
    write), run by Triton's interpreter on CPU tensors, stores what the CPU branch
    (rope_cache_write_reference) stores (codes within one step: the two RoPEs may differ by an ulp)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _GPU_BRANCH], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.fixture(scope="module")
def int8_vocab_artifacts(tiny_llama_builder, tmp_path_factory):
    """w4a8kv4 artifacts (RTN, fp32) of one tiny Llama (hidden 128, a char vocabulary of awkward size)
    with an int8 embedding and a W8A16 lm_head, and with the lm_head alone in 8 bits."""
    from natix.quant.export import export
    from natix.quant.w4a8kv4_config import W4A8KV4Config

    root = tmp_path_factory.mktemp("natix-int8-vocab")
    base = tiny_llama_builder(root / "base", hidden=128, max_positions=256)
    out = {}
    for name, (e, h) in {"e8h8": (8, 8), "e16h8": (16, 8)}.items():
        cfg = W4A8KV4Config(gptq=False, embed_bits=e, lm_head_bits=h)
        out[name] = export(str(base), cfg, root / name, dtype="fp32", calib="pydoc", calib_samples=4,
                           calib_max_length=64).out
    return out


def test_int8_vocab_matches_the_reference_path(int8_vocab_artifacts, natix_factory):
    """embed_bits / lm_head_bits = 8: the natix engine on CPU (the embedding dequantized once at load, lm_head
    as x.float() @ dequant(W).T) generates what the hf engine's reference modules do."""
    import torch

    from natix.engines.natix.weights import Int8Rows

    spec = SamplingSpec(max_tokens=16)
    for name, art in int8_vocab_artifacts.items():
        nx = natix_factory(art, page_size=8, num_kv_pages=64, prefill_attention="quantized")
        vocab = nx.runner.model.vocab
        assert vocab.head_int8 and vocab.embed_int8 == (name == "e8h8")
        assert isinstance(vocab.embed, torch.Tensor) and vocab.embed.dtype == torch.float32  # CPU: dequantized once
        assert isinstance(vocab.lm_head, Int8Rows) and vocab.head_f32 is not None
        got = nx.generate(PROMPTS, spec)
        e = create_engine("hf")
        e.load(EngineConfig(model=str(art), extra={"prefill_attention": "quantized"}))
        ref = e.generate(PROMPTS, spec)
        e.close()
        assert _tokens(got) == _tokens(ref), name
        gaps = sorted(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g[0].token_logprobs, r[0].token_logprobs))
        assert gaps[len(gaps) // 2] < 1e-5 and gaps[-1] < 0.2, (name, gaps[-8:])


def test_int8_vocab_weights_and_random_weights():
    """from_hf_model's Int8Rows read as the dense tensor they stand for (dtype, device, shape) and travel
    with ModelWeights.to; random_weights(embed_bits=8, lm_head_bits=8) draws them (tied: one object), and
    the engine runs them as the dense model of their dequantized tensors."""
    import dataclasses

    import torch

    from natix.engines.natix.engine import NatixEngine
    from natix.engines.natix.spec import EngineLoadError, EngineOptions, ModelSpec
    from natix.engines.natix.weights import Int8Rows, random_weights

    small = ModelSpec(arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                      vocab=301, rms_eps=1e-5, max_positions=512)
    w16 = random_weights(small, "w4a8kv4", dtype=torch.float32, seed=3)
    w8 = random_weights(small, "w4a8kv4", dtype=torch.float32, seed=3, embed_bits=8, lm_head_bits=8)
    assert isinstance(w8.embed, Int8Rows) and isinstance(w8.lm_head, Int8Rows)
    assert w8.embed.dtype == torch.float32 and w8.embed.shape == (301, 64) and w8.embed.device.type == "cpu"
    assert w8.info["embed_bits"] == 8 and w8.info["lm_head_bits"] == 8
    # int8 + a float32 scale per row instead of float32 rows, for both tables
    assert w16.nbytes() - w8.nbytes() == 2 * (301 * 64 * 3 - 301 * 4)
    moved = w8.to(torch.device("cpu"), torch.bfloat16)
    assert isinstance(moved.lm_head, Int8Rows) and moved.lm_head.dtype == torch.bfloat16
    assert moved.lm_head.scale.dtype == torch.float32 and moved.lm_head.qweight.dtype == torch.int8
    tied = random_weights(dataclasses.replace(small, tie_embeddings=True), "dense", embed_bits=8, lm_head_bits=8)
    assert tied.embed is tied.lm_head and tied.to(torch.device("cpu"), torch.float32).embed is not None
    with pytest.raises(EngineLoadError, match="embed_bits must be one of 16, 8"):
        random_weights(small, "dense", embed_bits=4)
    dense = dataclasses.replace(w8, embed=w8.embed.dequantized(), lm_head=w8.lm_head.dequantized())
    opts = dict(num_kv_pages=32, max_model_len=128, kv_cache="none")
    runs = []
    for w in (w8, dense):
        e = NatixEngine()
        e.load_weights(w, options=EngineOptions(**opts))
        runs.append(e.generate([[1, 2, 3, 4], [7] * 9], SamplingSpec(max_tokens=8)))
        e.close()
    assert _tokens(runs[0]) == _tokens(runs[1])
    assert max(abs(a - b) for g, r in zip(*runs) for a, b in zip(g[0].token_logprobs, r[0].token_logprobs)) < 1e-5


_VOCAB_GPU_BRANCH = r"""
import types, torch
from natix.engines.natix.layers import VocabTables
from natix.engines.natix.weights import Int8Rows
g = torch.Generator().manual_seed(0)
V, D, dt = 203, 96, torch.float16  # the interpreter's bf16 dot is wrong (natix.kernels.paged_attention)
emb = Int8Rows.quantize(torch.randn(V, D, generator=g) * 0.05).to("cpu", dt)
head = Int8Rows.quantize(torch.randn(V, D, generator=g) * 0.05).to("cpu", dt)
ids = torch.tensor([0, 5, 202, 5, 17])
x = torch.randn(12, D, generator=g).to(dt)
out = {}
for gpu in (False, True):
    vt = VocabTables(emb, head, types.SimpleNamespace(gpu=gpu), dt)
    assert isinstance(vt.embed, Int8Rows) == gpu  # CUDA keeps the int8 table
    # 5 and 12 rows: two M buckets with the same BM and different tiles, through one VocabTables
    # (the 12-row one first: a launcher cached by BM alone would then run 5 rows with 64-wide tiles on a 256-wide grid)
    m_, l_ = vt.logits(x), vt.logits(x[:5])
    out[gpu] = (vt.embedding(ids), l_, m_, vt.logits(x[:0]))
(e0, l0, m0, z0), (e1, l1, m1, z1) = out[False], out[True]
assert torch.equal(e0, e1) and e1.dtype == dt
for a, b in ((l0, l1), (m0, m1)):
    assert (a.float() - b.float()).abs().max() <= 2e-3 * a.float().abs().max(), (a - b).abs().max()
assert z1.shape == (0, V)
print("ok")
"""


def test_int8_vocab_gpu_branch_in_the_triton_interpreter():
    """The CUDA branch of the 8-bit embedding (gather x scale on the int8 table) and lm_head (the W8A16
    kernel through its Launcher), run by Triton's interpreter on CPU tensors, equals the CPU branch
    (the embedding exactly; the logits to float32 summation order and one fp16 rounding)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _VOCAB_GPU_BRANCH], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_warmup_prefill_runs_the_context_path_on_the_scratch_page():
    """warmup_prefill (CUDA's load-time warm-up, here on CPU): prefills of every M bucket and one after a
    cached page, all on the scratch page; no page is taken and generation is unchanged."""
    import torch

    from natix.engines.natix.engine import NatixEngine
    from natix.engines.natix.spec import EngineOptions, ModelSpec
    from natix.engines.natix.weights import random_weights

    spec = ModelSpec(arch="llama", hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=256,
                     vocab=300, rms_eps=1e-5, max_positions=256)
    w = random_weights(spec, "w4a8kv4", dtype=torch.float32, seed=0)
    e = NatixEngine()
    e.load_weights(w, options=EngineOptions(num_kv_pages=32, max_model_len=128, page_size=8, max_num_batched_tokens=40))
    calls = []
    real = e.runner.model._with_context
    e.runner.model._with_context = lambda *a: calls.append(1) or real(*a)
    before = e.generate([[5, 6, 7, 8]], SamplingSpec(max_tokens=6))[0][0].token_ids
    free = e.scheduler.blocks.num_free
    assert e.runner.warmup_prefill() and calls  # the context path ran
    assert e.scheduler.blocks.num_free == free
    assert e.generate([[5, 6, 7, 8]], SamplingSpec(max_tokens=6))[0][0].token_ids == before
