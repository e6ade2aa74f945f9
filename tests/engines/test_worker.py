"""RemoteEngine: the hf engine in a child process (same interpreter) behaves like in-process."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine
from natix.engines.worker import RemoteEngine, RemoteEngineError, WorkerDied

PROMPTS = ["hello world", "The answer is"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the in-process side (see conftest)
SPECS = [
    SamplingSpec(max_tokens=8),
    SamplingSpec(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=3, stop=("e",)),
]


@pytest.fixture(scope="module")
def remote(tiny_model_dir):
    eng = RemoteEngine(sys.executable, "hf", env=ONE_THREAD)
    eng.load(EngineConfig(model=tiny_model_dir, device="cpu"))
    yield eng
    eng.close()


def test_round_trip_matches_in_process(remote, tiny_model_dir):
    local = create_engine("hf")
    local.load(EngineConfig(model=tiny_model_dir, device="cpu"))
    for spec in SPECS:
        want, got = local.generate(PROMPTS, spec), remote.generate(PROMPTS, spec)
        assert len(got) == len(want)
        for w_per, g_per in zip(want, got):
            assert len(g_per) == spec.n
            for w, g in zip(w_per, g_per):
                assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
                assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-5)
                assert g.timing is not None and g.timing.ttft_s > 0
    local.close()
    assert remote.info()["engine"] == "hf"


def test_remote_exception_surfaces(remote):
    with pytest.raises(ValueError, match="empty after tokenization") as exc:
        remote.generate([""], SamplingSpec())
    assert isinstance(exc.value, RemoteEngineError)
    assert "Traceback" in exc.value.remote_traceback and "hf_engine.py" in exc.value.remote_traceback
    # the worker keeps serving after an error
    assert remote.generate(PROMPTS[:1], SamplingSpec(max_tokens=2))[0][0].num_tokens >= 1


def test_load_error_and_clean_close(tiny_model_dir):
    eng = RemoteEngine(sys.executable, "hf", env=ONE_THREAD)
    with pytest.raises(RemoteEngineError, match="not found"):
        eng.load(EngineConfig(model=str(tiny_model_dir) + "-missing"))
    with pytest.raises(RemoteEngineError, match="unknown engine"):
        eng._call("load", engine="no-such-engine", cfg={"model": "x"})
    assert eng.close() == 0
    assert eng.proc.poll() == 0


def test_crash_is_isolated():
    eng = RemoteEngine(sys.executable, "hf", env=ONE_THREAD)
    os.kill(eng.pid, signal.SIGKILL)
    eng.proc.wait()
    with pytest.raises(WorkerDied):
        eng.generate(PROMPTS, SamplingSpec())
    eng.close()


def test_missing_interpreter():
    with pytest.raises(WorkerDied, match="cannot start worker"):
        RemoteEngine("/nonexistent/python", "hf")
