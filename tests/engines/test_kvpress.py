"""KV-cache compression through kvpress presses in the hf engine.

Spec parsing runs everywhere. Everything that builds a press is marked ``kvpress`` and skips
unless kvpress imports, i.e. it runs in the side environment:

    .venvs/kvpress/bin/python -m pytest tests/engines/test_kvpress.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine
from natix.engines.kv_compression import (
    KVPRESS_ENV_HINT, PRESSES, PressSpecError, kvpress_available, parse_press_spec,
)

HAVE_KVPRESS = kvpress_available()
needs_kvpress = pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress not importable (use .venvs/kvpress)")

# 136 characters = 136 tokens with the character-level fixture tokenizer (> snapkv's 64 window)
LONG = "The quick brown fox jumps over the lazy dog. " * 3 + "Answer:"


def test_parse_press_spec():
    s = parse_press_spec("knorm:0.25")
    assert (s.name, s.ratio) == ("knorm", 0.25) and str(s) == "knorm:0.25"
    assert parse_press_spec("Streaming-LLM:0.5").name == "streaming_llm"
    assert parse_press_spec("snapkv").ratio == 0.5


@pytest.mark.parametrize("bad, msg", [
    ("nope:0.5", "available presses: .*knorm.*snapkv"),
    ("knorm:1.0", r"outside \[0, 1\)"),
    ("knorm:-0.1", r"outside \[0, 1\)"),
    ("knorm:half", "not a number"),
    ("", "empty kv press spec"),
])
def test_bad_press_specs(bad, msg):
    with pytest.raises(PressSpecError, match=msg):
        parse_press_spec(bad)


@pytest.mark.skipif(HAVE_KVPRESS, reason="checks the error where kvpress is missing")
def test_clear_error_without_kvpress(tiny_model_dir):
    eng = create_engine("hf")
    with pytest.raises(ImportError, match="kvpress environment: scripts/make_env.sh kvpress"):
        eng.load(EngineConfig(model=tiny_model_dir, kv_press="knorm:0.5"))
    assert "--python .venvs/kvpress/bin/python" in KVPRESS_ENV_HINT


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu"))
    out = eng.generate([LONG], SamplingSpec(max_tokens=8))[0][0]
    eng.close()
    return out


@pytest.mark.kvpress
@needs_kvpress
@pytest.mark.parametrize("name", sorted(PRESSES))
def test_press_compresses_and_generates(name, tiny_model_dir, reference):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu", kv_press=f"{name}:0.5", max_batch_size=2))
    res = eng.generate([LONG, LONG[:-10]], SamplingSpec(n=3, temperature=0.8, max_tokens=6, seed=0))
    assert [len(per) for per in res] == [3, 3]
    assert all(c.num_tokens >= 1 and c.finish_reason in ("stop", "length") for per in res for c in per)
    stats = eng.info()["last_prefill"]
    assert len(stats) == 4  # one prompt per batch: 3 samples -> batches of 2 + 1, per prompt
    for st in stats:
        kept = st["cache_tokens"]
        if name == "pyramidkv":  # per-layer budgets around the target
            assert kept < st["prompt_tokens"]
        else:
            assert kept == int(st["prompt_tokens"] * 0.5), st
    # The first token comes from the prefill, whose attention still saw the whole prompt
    # (presses prune after each layer's attention): it and its logprob must not change.
    g = eng.generate([LONG], SamplingSpec(max_tokens=8))[0][0]
    assert g.token_ids[0] == reference.token_ids[0]
    assert g.token_logprobs[0] == pytest.approx(reference.token_logprobs[0], abs=1e-4)
    eng.close()


@pytest.mark.kvpress
@needs_kvpress
def test_ratio_zero_press_equals_no_press(tiny_model_dir, reference):
    """Ratio 0 prunes nothing: the press path (maskless decode, explicit positions) must then
    reproduce the plain engine token for token."""
    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu", kv_press="knorm:0.0"))
    g = eng.generate([LONG], SamplingSpec(max_tokens=8))[0][0]
    assert g.token_ids == reference.token_ids
    assert g.token_logprobs == pytest.approx(reference.token_logprobs, abs=1e-4)
    eng.close()


@pytest.mark.kvpress
@needs_kvpress
def test_press_error_names_the_press(tiny_model_dir):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu", kv_press="snapkv:0.5"))
    with pytest.raises(RuntimeError, match="kv press snapkv:0.5 failed on a 5-token prompt"):
        eng.generate(["short"], SamplingSpec(max_tokens=2))  # shorter than snapkv's window
    eng.close()


@pytest.mark.kvpress
@pytest.mark.slow
@needs_kvpress
def test_smollm2_cache_halves_and_generates():
    from natix.engines.chat import apply_chat

    eng = create_engine("hf")
    eng.load(EngineConfig(model="smollm2-135m", kv_press="knorm:0.5"))
    text = "The city began as a fishing village on the river; merchants built a market. " * 24
    prompt = apply_chat(eng.tokenizer, text + "\nSummarize the text in one sentence.")
    c = eng.generate([prompt], SamplingSpec(max_tokens=12))[0][0]
    (st,) = eng.info()["last_prefill"]
    assert st["prompt_tokens"] > 300
    assert st["cache_tokens"] == int(st["prompt_tokens"] * 0.5)
    assert c.num_tokens >= 1 and c.text.strip()
    eng.close()


KVPRESS_PY = Path(__file__).resolve().parents[2] / ".venvs" / "kvpress" / "bin" / "python"


@pytest.mark.kvpress
@pytest.mark.skipif(not KVPRESS_PY.exists(), reason="no .venvs/kvpress (scripts/make_env.sh kvpress)")
def test_remote_engine_in_kvpress_env(tiny_model_dir):
    """The intended use from the main venv: the hf engine with a press, in the side env."""
    from natix.engines.worker import RemoteEngine

    with RemoteEngine(str(KVPRESS_PY), "hf", env={"OMP_NUM_THREADS": "1"}) as eng:
        eng.load(EngineConfig(model=tiny_model_dir, device="cpu", kv_press="expected_attention:0.5"))
        c = eng.generate([LONG], SamplingSpec(max_tokens=4))[0][0]
        (st,) = eng.info()["last_prefill"]
    assert c.num_tokens >= 1
    assert st["cache_tokens"] == int(st["prompt_tokens"] * 0.5)
