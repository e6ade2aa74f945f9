"""Top-k / top-p filtering and raw-distribution logprobs of natix.engines.sampler."""

from __future__ import annotations

import math

import pytest

from natix.engines.base import SamplingSpec


def test_filter_top_k_and_top_p():
    import torch

    from natix.engines.sampler import filter_logits

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    k2 = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.7)  # 0.5 < 0.7 <= 0.8: keep two
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_k=0, top_p=0.5)  # the first token alone reaches 0.5
    assert torch.isfinite(p).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)


def test_logprobs_are_raw_distribution():
    import torch

    from natix.engines.sampler import sample_next

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    tok, lp = sample_next(logits, SamplingSpec(temperature=0.3, top_k=2, seed=0), gen)
    ref = torch.log_softmax(logits, -1)[0, tok.item()].item()
    assert lp.item() == pytest.approx(ref)
    tok, lp = sample_next(logits, SamplingSpec(), None)
    log_z = math.log(sum(math.exp(x) for x in (2, 1, 0, -1)))
    assert tok.item() == 0 and lp.item() == pytest.approx(2.0 - log_z)
