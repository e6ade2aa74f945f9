"""The hf engine on a CUDA device: same greedy tokens as on CPU (fp32), reproducible sampling,
and a bf16 run (the default dtype on CUDA). Skipped without CUDA."""

from __future__ import annotations

import pytest

from natix.engines.base import EngineConfig, SamplingSpec, create_engine

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

PROMPTS = ["hello world", "The answer is", "a", "Once upon a time, in a land far away"]


def _load(model_dir: str, device: str, dtype: str):
    eng = create_engine("hf")
    eng.load(EngineConfig(model=model_dir, device=device, dtype=dtype))
    return eng


def test_cuda_greedy_matches_cpu_fp32(tiny_model_dir):
    cpu, gpu = _load(tiny_model_dir, "cpu", "fp32"), _load(tiny_model_dir, "cuda", "fp32")
    try:
        assert gpu.info()["device"] == "cuda"
        spec = SamplingSpec(max_tokens=12)
        a, b = cpu.generate(PROMPTS, spec), gpu.generate(PROMPTS, spec)
        assert [c[0].token_ids for c in a] == [c[0].token_ids for c in b]
        for x, y in zip(a, b):
            assert torch.allclose(torch.tensor(x[0].token_logprobs), torch.tensor(y[0].token_logprobs), atol=1e-3)
    finally:
        cpu.close()
        gpu.close()


def test_cuda_sampling_reproducible_bf16(tiny_model_dir):
    eng = _load(tiny_model_dir, "auto", "auto")
    try:
        assert eng.info()["device"] == "cuda" and "bfloat16" in eng.info()["dtype"]
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=8, seed=3)
        r1, r2 = eng.generate(PROMPTS, spec), eng.generate(PROMPTS, spec)
        assert [[c.token_ids for c in p] for p in r1] == [[c.token_ids for c in p] for p in r2]
        for per in r1:
            assert len(per) == 4
            for c in per:
                assert len(c.token_logprobs) == c.num_tokens and all(lp <= 0 for lp in c.token_logprobs)
                assert c.timing.ttft_s > 0 and c.timing.total_s >= c.timing.ttft_s
    finally:
        eng.close()
