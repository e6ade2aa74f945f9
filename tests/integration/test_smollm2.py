"""The embedded SmolLM2-135M with the demo adapter, end to end on real generations (CPU).

Marked slow: the first run converts the GGUF (~40 s on 2 cores, then cached under
$NATIX_CACHE); each test module loads the model once.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    import torch

    from natix.bench.matrix import demo_adapter_path
    from natix.bench.tasks import get_task
    from natix.engines.base import EngineConfig, create_engine
    from natix.engines.chat import apply_chat

    torch.manual_seed(0)
    engine = create_engine("hf")
    engine.load(EngineConfig(model="smollm2-135m", adapter=str(demo_adapter_path()), device="cpu"))
    task = get_task("chain_sum")
    items = task.items("eval", 6)
    prompts = [apply_chat(engine.tokenizer, task.user_text(it)) for it in items]
    yield engine, task, items, prompts
    engine.close()


def test_demo_adapter_merges_with_parity_and_solves_problems(setup) -> None:
    from natix.engines.base import SamplingSpec

    engine, task, items, prompts = setup
    report = engine.info()["merge_report"]
    assert report["adapter_type"] == "LORA" and report["parity_error"] < 1e-4
    out = engine.generate(prompts, SamplingSpec(max_tokens=task.max_tokens))
    texts = [o[0].text for o in out]
    correct = sum(task.is_correct(task.extract(t), it) for t, it in zip(texts, items))
    verified = sum(task.verify(it, t) == 1.0 for t, it in zip(texts, items))
    # 67% on 300 items (H100 check in the adapter's natix_training.json); 6 items leave noise.
    assert correct >= 2, texts
    assert verified >= 2, texts
    for o in out:
        c = o[0]
        assert c.finish_reason == "stop" and "The answer is" in c.text
        assert len(c.token_logprobs) == c.num_tokens and all(lp <= 0 for lp in c.token_logprobs)
        assert c.timing.ttft_s > 0 and c.timing.total_s >= c.timing.ttft_s


def test_strategies_on_real_samples(setup) -> None:
    from natix.engines.base import SamplingSpec
    from natix.scaling import parse_strategy, run_shared

    engine, task, items, prompts = setup
    by_prompt = dict(zip(prompts, items))
    strategies = [parse_strategy(s, extractor="number", verifier=lambda p, t: task.verify(by_prompt[p], t))
                  for s in ("maj@6", "bo6:verifier", "bo6:logprob", "adaptive@6:beta,threshold=0.8")]
    run = run_shared(engine, prompts[:3], SamplingSpec(temperature=0.7, max_tokens=task.max_tokens, seed=1),
                     strategies)
    samples = run.draws[0]
    for p, comps in enumerate(samples):
        assert len(comps) == 6 and len({c.text for c in comps}) >= 1
        answers = [task.extract(c.text) for c in comps]
        maj = run.results["maj@6"][p]
        # the winner has the most votes among the real samples
        assert maj.answer is None or answers.count(maj.answer) == max(answers.count(a) for a in set(answers) if a)
        bo = run.results["bo6:verifier"][p]
        if any(task.verify(items[p], c.text) == 1.0 for c in comps):
            assert task.verify(items[p], bo.completion.text) == 1.0
    ada = run.results["adaptive@6:beta,threshold=0.8,round=2,min=1"]
    assert all(1 <= r.samples_spent <= 6 for r in ada)
