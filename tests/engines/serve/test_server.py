"""natix-serve on the tiny random Llama (one server for the module, see conftest): the official
openai client, streaming, n, logprobs, stop, seed, /metrics, /tokenize, the API key, bad input,
overload, client disconnect, and the openai-http engine against the in-process engine."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

pytest.importorskip("openai")



@pytest.fixture(scope="module")
def client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server.v1, api_key=tiny_server.api_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, headers={"Authorization": f"Bearer {tiny_server.api_key}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    from natix.engines.base import EngineConfig, create_engine

    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu"))
    yield eng
    eng.close()


def _metrics(http) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(metrics, name, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_models_and_health(client, tiny_server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"


def test_completion_matches_the_in_process_engine(client, local):
    from natix.engines.base import SamplingSpec

    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    ref = local.generate(["hello world"], SamplingSpec(max_tokens=12))[0][0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len("hello world") and r.usage.completion_tokens == ref.num_tokens
    assert r.id.startswith("cmpl-")


def test_chat_streaming_n_and_usage(client):
    msgs = [{"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens

    r = client.completions.create(model="tiny", prompt="abc", n=4, max_tokens=6, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) > 1  # four different samples
    s = client.completions.create(model="tiny", prompt=["abc", "xyz"], n=2, max_tokens=4, temperature=1.0, stream=True)
    seen = {c.index for chunk in s for c in chunk.choices if c.finish_reason}
    assert seen == {0, 1, 2, 3}


def test_logprobs_stop_seed_echo(client, local):
    from natix.engines.base import SamplingSpec

    r = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ref = local.generate(["hello"], SamplingSpec(max_tokens=8, top_logprobs=3))[0][0]
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx(list(ref.token_logprobs), abs=1e-4)
    assert all(len(t) == 3 and max(t.values()) == pytest.approx(v, abs=1e-4) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)

    full = r.choices[0].text
    stop = full[3]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    kw = dict(model="tiny", prompt="once", max_tokens=10, temperature=1.0, n=2)
    a = client.completions.create(seed=11, **kw)
    b = client.completions.create(seed=11, **kw)
    c = client.completions.create(seed=12, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] != [x.text for x in c.choices]

    e = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0, echo=True)
    assert e.choices[0].text == "hello" + full


def test_tokenize_and_token_ids(http):
    r = http.post("/tokenize", json={"prompt": "abc"}).json()
    assert r["count"] == 3 and len(r["tokens"]) == 3
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "abc"
    out = http.post("/v1/completions", json={"prompt": r["tokens"], "max_tokens": 4, "temperature": 0,
                                             "return_token_ids": True, "logprobs": 0,
                                             "return_tokens_as_token_ids": True}).json()
    ch = out["choices"][0]
    assert out["prompt_token_ids"] == r["tokens"]
    assert ch["logprobs"]["tokens"] == [f"token_id:{i}" for i in ch["token_ids"]]


def test_metrics_count_what_was_served(client, http):
    before = _metrics(http)
    client.completions.create(model="tiny", prompt="metrics", max_tokens=7, temperature=0, n=2)
    after = _metrics(http)
    assert _value(after, "natix:generation_tokens_total") - _value(before, "natix:generation_tokens_total") >= 2
    assert _value(after, "natix:prompt_tokens_total") - _value(before, "natix:prompt_tokens_total") == len("metrics")
    for name in ("natix:time_to_first_token_seconds_count", "natix:e2e_request_latency_seconds_count",
                 "natix:request_queue_time_seconds_count"):
        assert _value(after, name) > _value(before, name), name
    assert _value(after, "natix:request_success_total") - _value(before, "natix:request_success_total") == 2
    for gauge in ("natix:num_requests_running", "natix:num_requests_waiting", "natix:kv_cache_usage_perc"):
        assert (gauge, (("model_name", "tiny"),)) in after


def test_api_key(tiny_server):
    r = httpx.post(tiny_server.v1 + "/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(tiny_server.v1 + "/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(tiny_server.url + "/metrics").status_code == 200  # scrapes need no key


@pytest.mark.parametrize("body,status,param", [
    (b'{"prompt": "x", "max_tokens": ', 400, None),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": 3.5}, 400, "prompt"),
    ({"prompt": "x", "temperature": [1]}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 9}, 400, "n"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x" * 1_000_000}, 400, "prompt"),
    ({"prompt": "x" * 900, "max_tokens": 200}, 400, "max_tokens"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [10**7]}, 400, "prompt"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "x", "natix": {"strategy": "maj@4", "bogus": 1}}, 400, "natix.bogus"),
    ({"prompt": "x", "natix": {"strategy": "maj@4", "task": "nope"}}, 400, "natix.task"),
    ({"prompt": "x", "natix": {"strategy": "maj@4"}, "temperature": 0}, 400, "temperature"),
    ({"prompt": "x", "natix": {"strategy": "bo4:verifier", "task": "chain_sum"}}, 400, "natix.strategy"),
    ({"prompt": "x", "natix": {"strategy": "maj@64"}}, 400, "natix.strategy"),
    ({"prompt": "x", "natix": {"strategy": "maj@4", "extractor": "regex:(a+)+$"}}, 400, "natix.extractor"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"12": 5}}, 400, "logit_bias"),
])
def test_bad_completion_requests(http, body, status, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = http.post("/v1/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages"),  # no chat template for multi-turn
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_requests(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_voting_extension_on_the_tiny_model(http):
    r = http.post("/v1/completions", json={"prompt": "7 + 8 =", "max_tokens": 6, "temperature": 1.0,
                                           "natix": {"strategy": "maj@4"}}).json()
    nx = r["natix"]
    assert nx["strategy"] == "maj@4" and nx["samples_spent"] == 4 and nx["budget"] == 4
    assert len(nx["answers"]) == 4 and len(r["choices"]) == 1
    assert r["usage"]["completion_tokens"] >= 4


def test_overload_gets_429_and_every_accepted_request_completes_once(tiny_server):
    # 4 running + 4 queued fit; 24 at once must overflow
    def one(i: int) -> tuple[int, str, dict]:
        r = httpx.post(tiny_server.v1 + "/completions", timeout=60,
                       headers={"Authorization": f"Bearer {tiny_server.api_key}", "X-Request-Id": f"load-{i}"},
                       json={"prompt": f"request {i}", "max_tokens": 64, "temperature": 0})
        return r.status_code, r.headers.get("x-request-id", ""), {**r.json(), "retry_after": r.headers.get("retry-after")}

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= 8, codes
    ok_ids = [rid for c, rid, _ in results if c == 200]
    assert len(ok_ids) == len(set(ok_ids))  # each request answered exactly once
    for c, rid, body in results:
        if c == 200:
            assert body["id"] == f"cmpl-{rid}" and body["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert body["error"]["type"] == "rate_limit_error" and body["retry_after"] == "1"
    assert httpx.get(tiny_server.url + "/health").json()["in_flight"] == 0


def test_client_disconnect_aborts_the_request(tiny_server, http):
    before = _value(_metrics(http), "natix:request_success_total", finished_reason="abort")
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", tiny_server.v1 + "/completions", headers={"Authorization": f"Bearer {tiny_server.api_key}"},
                      json={"prompt": "long", "max_tokens": 256, "n": 8, "temperature": 1.0, "stream": True}):
            pass  # headers are in: the request is queued or running; hang up without reading
    deadline = time.monotonic() + 15
    while _value(_metrics(http), "natix:request_success_total", finished_reason="abort") == before:
        assert time.monotonic() < deadline, "the disconnected request was never aborted"
        time.sleep(0.1)
    assert http.get("/health").json()["in_flight"] == 0


def test_openai_http_engine_gives_the_in_process_greedy_tokens(tiny_server, tiny_model_dir, local):
    from natix.engines.base import EngineConfig, SamplingSpec, create_engine

    eng = create_engine("openai-http")
    eng.load(EngineConfig(model=tiny_model_dir, max_batch_size=4,
                          extra={"endpoint": tiny_server.v1, "api_key": tiny_server.api_key}))
    try:
        prompts = ["hello world", "The answer is", "a", "Once upon a time"]
        spec = SamplingSpec(max_tokens=16)
        got, ref = eng.generate(prompts, spec), local.generate(prompts, spec)
        for g, r in zip(got, ref):
            assert g[0].token_ids == r[0].token_ids and g[0].text == r[0].text
            assert g[0].finish_reason == r[0].finish_reason
            assert g[0].token_logprobs == pytest.approx(r[0].token_logprobs, abs=1e-4)
            assert 0 < g[0].timing.ttft_s <= g[0].timing.total_s
        seeded = SamplingSpec(n=3, temperature=1.0, max_tokens=8, seed=5, top_logprobs=2, stop=("z",))
        a, b = eng.generate(["hi"], seeded), eng.generate(["hi"], seeded)
        assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
        assert all(len(c.top_logprobs) == c.num_tokens and "z" not in c.text for c in a[0])
    finally:
        eng.close()


def test_serve_load_against_the_server(tiny_server, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from natix.bench.cli import main

    out = tmp_path / "load.jsonl"
    res = CliRunner().invoke(main, ["serve-load", "--endpoint", tiny_server.v1, "--api-key", tiny_server.api_key,
                                    "--model", tiny_model_dir, "--requests", "8", "--concurrency", "4",
                                    "--max-tokens", "16", "--out", str(out), "--label", "tiny"])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["completed"] == 8 and row["failed"] == 0 and row["mode"] == "http"
    for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
        assert set(row[key]) >= {"mean", "p50", "p90", "p99"}
    assert row["output_throughput"] > 0 and row["request_throughput"] > 0 and "goodput" in row


def test_natix_bench_run_measures_the_server_through_openai_http(tiny_server, tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from natix.bench.cli import main
    from natix.bench.runner import load_cells

    monkeypatch.setenv("OPENAI_BASE_URL", tiny_server.v1)
    monkeypatch.setenv("OPENAI_API_KEY", tiny_server.api_key)
    out = tmp_path / "bench"
    res = CliRunner().invoke(main, ["run", "--engine", "openai-http", "--model", tiny_model_dir, "--variant", "base",
                                    "--strategy", "greedy", "--strategy", "maj@2", "--items", "2", "--max-tokens", "8",
                                    "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = load_cells(out)
    assert sorted(r["strategy"] for r in rows) == ["greedy", "maj@2"]
    for r in rows:
        assert r["engine"] == "openai-http" and r["engine_info"]["endpoint"] == tiny_server.v1
        assert r["draw"]["tokens"] > 0 and r["ttft_s"]["p50"] > 0
