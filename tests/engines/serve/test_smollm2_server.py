"""natix-serve on the embedded SmolLM2-135M + demo adapter, through the official openai client:
chat with the model's template on chain_sum problems, completions, streaming, n=4, logprobs,
stop, seed, the natix voting extension (maj@4, best-of-4 by the task's verifier, adaptive) and
/metrics. One server for the module (slow: the model loads and merges the adapter)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(serve_starter):
    from natix.bench.matrix import demo_adapter_path

    s = serve_starter(["--model", "smollm2-135m", "--adapter", str(demo_adapter_path()), "--device", "cpu",
                       "--max-batch-size", "16", "--max-n", "8"], timeout=300)
    yield s
    assert s.stop() == 0, s.tail()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def problems():
    from natix.bench.tasks import get_task

    task = get_task("chain_sum")
    items = task.items("eval", 3)
    return task, items, [task.user_text(it) for it in items]


def test_chat_solves_chain_sum_with_the_adapter(client, problems):
    task, items, texts = problems
    solved = 0
    for it, text in zip(items, texts):
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": text}],
                                           max_completion_tokens=96, temperature=0)
        out = r.choices[0].message.content
        assert "The answer is" in out and r.choices[0].finish_reason == "stop"
        solved += task.verify(it, out) == 1.0
    assert solved >= 1  # the adapter solves ~70% greedily; 3 items leave noise


def test_the_server_prompt_is_the_benchmarks_prompt(server, problems):
    import httpx

    from natix.engines.chat import apply_chat
    from natix.quant.models import load_tokenizer

    _, _, texts = problems
    tok = load_tokenizer("smollm2-135m")
    served = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": texts[0]}]}).json()
    assert served["tokens"] == tok(apply_chat(tok, texts[0]), add_special_tokens=False).input_ids


def test_completions_stream_n_logprobs_stop_seed(client, problems):
    from natix.engines.chat import apply_chat
    from natix.quant.models import load_tokenizer

    _, _, texts = problems
    prompt = apply_chat(load_tokenizer("smollm2-135m"), texts[0])
    whole = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0, logprobs=2)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == whole.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == whole.choices[0].text

    cut = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0, stop=["="])
    assert cut.choices[0].text == whole.choices[0].text.split("=")[0] and cut.choices[0].finish_reason == "stop"

    kw = dict(model="smollm2-135m", prompt=prompt, max_tokens=24, temperature=0.9, n=4)
    a, b = client.completions.create(seed=3, **kw), client.completions.create(seed=3, **kw)
    assert len(a.choices) == 4 and [c.text for c in a.choices] == [c.text for c in b.choices]


def test_voting_extension(client, server, problems):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    task, items, texts = problems
    msgs = [{"role": "user", "content": texts[0]}]
    common = dict(model="smollm2-135m", messages=msgs, max_completion_tokens=96, temperature=0.7, seed=0)
    maj = client.chat.completions.create(**common, extra_body={"natix": {"strategy": "maj@4", "task": "chain_sum"}})
    nx = maj.model_extra["natix"]
    assert nx["strategy"] == "maj@4" and nx["samples_spent"] == 4 and len(nx["answers"]) == 4
    assert nx["answer"] is None or nx["vote_share"] == pytest.approx(nx["votes"][nx["answer"]] / 4)
    if nx["answer"] is not None:
        assert task.extract(maj.choices[0].message.content) == nx["answer"]

    bo = client.chat.completions.create(**common, extra_body={"natix": {"strategy": "bo4:verifier", "task": "chain_sum"}})
    nb = bo.model_extra["natix"]
    assert nb["score"] == max(nb["scores"]) == task.verify(items[0], bo.choices[0].message.content)
    assert bo.usage.completion_tokens > 4

    ada = client.chat.completions.create(**common, extra_body={"natix": {"strategy": "adaptive@8:beta", "task": "chain_sum"}})
    na = ada.model_extra["natix"]
    assert 1 <= na["samples_spent"] <= 8 and na["budget"] == 8
    assert na["stopped_early"] == (na["samples_spent"] < 8)

    text = httpx.get(server.url + "/metrics").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["natix:test_time_samples_total"] >= 4 + 4 + na["samples_spent"]
    assert samples["natix:e2e_request_latency_seconds_count"] >= 3
