"""The batching adapter and the engine loop, in process, over the hf engine on the tiny random
Llama: batching within the window, seeded requests alone, abort, failure isolation, strategies
through the loop; and the Completion fields the server relies on (top_logprobs, queue time)."""

from __future__ import annotations

import threading
import time

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine
from natix.engines.serve.adapter import BatchingAdapter
from natix.engines.serve.loop import EngineLoop, LoopEngine, RequestFailed
from natix.engines.streaming import RequestError, StreamingEngine

PROMPTS = ["hello world", "The answer is", "a", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu"))
    yield eng
    eng.close()


def _drain(adapter, timeout: float = 30.0):
    """Step until idle; return {request_id: {index: last delta}}."""
    out: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while adapter.has_unfinished():
        assert time.monotonic() < deadline, "adapter did not finish"
        for d in adapter.step():
            out.setdefault(d.request_id, {})[d.index] = d
    return out


def test_is_a_streaming_engine(engine):
    assert isinstance(BatchingAdapter(engine), StreamingEngine)


def test_requests_in_the_window_share_one_generate_call(engine):
    spec = SamplingSpec(max_tokens=10)
    adapter = BatchingAdapter(engine, window_s=0.5)
    ids = [adapter.add_request(p, spec) for p in PROMPTS]
    assert adapter.stats().waiting == 4
    done = _drain(adapter)
    assert adapter.batches == 1
    alone = [engine.generate([p], spec)[0][0] for p in PROMPTS]
    for rid, ref in zip(ids, alone):
        d = done[rid][0]
        assert d.finished and d.completion is not None
        assert d.token_ids == ref.token_ids and d.text == ref.text and d.finish_reason == ref.finish_reason
        assert d.completion.timing.queue_s is not None and d.completion.timing.queue_s >= 0


def test_different_specs_and_seeds_are_not_batched(engine):
    adapter = BatchingAdapter(engine, window_s=0.2)
    a = adapter.add_request("hello", SamplingSpec(max_tokens=4))
    b = adapter.add_request("hello", SamplingSpec(max_tokens=5))
    s1 = adapter.add_request("hello", SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=7))
    s2 = adapter.add_request("hello", SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=7))
    done = _drain(adapter)
    assert adapter.batches == 4
    assert len(done[a][0].token_ids) == 4 and len(done[b][0].token_ids) == 5
    # seeded requests run alone, so the same seed draws the same samples
    assert [done[s1][i].token_ids for i in range(2)] == [done[s2][i].token_ids for i in range(2)]


def test_abort_queued_and_running(engine):
    adapter = BatchingAdapter(engine, window_s=10.0)
    queued = adapter.add_request("hello", SamplingSpec(n=2, max_tokens=5))
    adapter.abort(queued)
    assert adapter.stats().waiting == 0
    deltas = adapter.step()
    assert {(d.request_id, d.index, d.finish_reason) for d in deltas} == {(queued, 0, "abort"), (queued, 1, "abort")}
    assert not adapter.has_unfinished()

    adapter = BatchingAdapter(engine, window_s=0.0)
    running = adapter.add_request("hello", SamplingSpec(max_tokens=200))
    kept = adapter.add_request("hello", SamplingSpec(max_tokens=200))
    stepper = threading.Thread(target=lambda: results.extend(adapter.step()))
    results: list = []
    stepper.start()
    deadline = time.monotonic() + 10
    while adapter.stats().running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    adapter.abort(running)
    stepper.join(30)
    by_id = {d.request_id: d for d in results}
    assert by_id[running].finish_reason == "abort" and by_id[running].token_ids == ()
    assert by_id[kept].finish_reason in ("stop", "length") and by_id[kept].token_ids


def test_refuses_what_it_can_never_run(engine):
    adapter = BatchingAdapter(engine)
    with pytest.raises(RequestError):
        adapter.add_request("", SamplingSpec())
    with pytest.raises(RequestError):
        adapter.add_request([1, 2, 3], SamplingSpec())  # token ids need a tokenizer
    rid = adapter.add_request("x", SamplingSpec(max_tokens=1), request_id="r1")
    with pytest.raises(RequestError):
        adapter.add_request("y", SamplingSpec(), request_id=rid)
    ids_adapter = BatchingAdapter(engine, tokenizer=engine.tokenizer)
    tok_ids = engine.tokenizer("hello", add_special_tokens=False).input_ids
    r = ids_adapter.add_request(tok_ids, SamplingSpec(max_tokens=6))
    assert _drain(ids_adapter)[r][0].token_ids == engine.generate(["hello"], SamplingSpec(max_tokens=6))[0][0].token_ids


class _Faulty:
    """The real engine, except that a batch holding the prompt "boom" raises (fault injection)."""

    name = "faulty"

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, spec):
        if "boom" in prompts:
            raise RuntimeError("injected failure")
        return self.engine.generate(prompts, spec)


def test_one_failing_request_fails_alone(engine):
    adapter = BatchingAdapter(_Faulty(engine), window_s=0.5)
    spec = SamplingSpec(max_tokens=5)
    good = [adapter.add_request(p, spec) for p in ("hello", "world")]
    bad = adapter.add_request("boom", spec)
    done = _drain(adapter)
    assert done[bad][0].finish_reason == "error" and "injected failure" in done[bad][0].error
    for rid in good:
        assert done[rid][0].finish_reason == "length" and len(done[rid][0].token_ids) == 5


def test_loop_engine_runs_strategies_through_the_loop(engine):
    from natix.scaling import parse_strategy

    loop = EngineLoop(BatchingAdapter(engine, window_s=0.01)).start()
    try:
        facade = LoopEngine(loop)
        spec = SamplingSpec(temperature=1.0, max_tokens=6, logprobs=True)
        res = parse_strategy("maj@4", extractor="number").run(facade, ["hello", "a"], spec)
        assert [r.samples_spent for r in res] == [4, 4] and facade.samples == 8
        ada = parse_strategy("adaptive@6:lead,round=2").run(facade, ["hello"], spec)[0]
        assert 2 <= ada.samples_spent <= 6
        facade.cancel()
        with pytest.raises(RequestFailed):
            facade.generate(["hello"], spec)
        assert loop.in_flight == 0
    finally:
        loop.stop()


class _BrokenStep:
    """A streaming engine whose step() raises once (an engine bug) and then works."""

    def __init__(self, inner):
        self.inner, self.broken = inner, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self):
        if self.broken:
            self.broken = False
            raise RuntimeError("step exploded")
        return self.inner.step()


def test_loop_survives_a_failing_step(engine):
    loop = EngineLoop(_BrokenStep(BatchingAdapter(engine, window_s=0.0))).start()
    try:
        facade = LoopEngine(loop)
        with pytest.raises(RequestFailed, match="step exploded"):
            facade.generate(["hello"], SamplingSpec(max_tokens=3))
        out = facade.generate(["hello"], SamplingSpec(max_tokens=3))
        assert len(out[0][0].token_ids) == 3 and loop.step_errors == 1
    finally:
        loop.stop()


def test_top_logprobs_from_hf_and_through_the_worker_format(engine):
    import math

    from natix.engines.worker import completion_from_json, completion_to_json

    spec = SamplingSpec(max_tokens=6, top_logprobs=3)
    c = engine.generate(["hello"], spec)[0][0]
    assert c.top_logprobs is not None and len(c.top_logprobs) == c.num_tokens
    for tok, lp, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs):
        assert len(top) == 3
        assert tok in top and math.isclose(top[tok], lp, abs_tol=1e-5)  # greedy: the chosen is the top
        assert max(top.values()) == top[tok]
    assert engine.generate(["hello"], SamplingSpec(max_tokens=2))[0][0].top_logprobs is None
    import json

    back = completion_from_json(json.loads(json.dumps(completion_to_json(c))))
    assert back == c


def test_serve_modules_import_light():
    import subprocess
    import sys

    code = ("import sys, natix.engines.serve.app, natix.engines.serve.cli, natix.engines.openai_http_engine, "
            "natix.bench.serve_load, natix.bench.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'uvicorn', 'httpx', 'tenacity') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the server modules pulled in: {out.stdout.strip()}"
