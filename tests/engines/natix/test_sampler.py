"""The device sampler: seeded draws do not depend on what else is in the batch."""
from __future__ import annotations

import torch

from natix.engines.natix.sampler import SamplingBatch, sample


def _batch(temp, top_k, top_p, seeds, any_filter):
    n = len(temp)
    return SamplingBatch(torch.tensor(temp), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(seeds),
                         torch.zeros(n, dtype=torch.int64), torch.arange(n, dtype=torch.int64), True, any_filter)


def test_a_row_without_filters_draws_the_same_token_when_another_row_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g) * 3
    plain = _batch([1.0] * 64, [0] * 64, [1.0] * 64, list(range(64)), False)
    # every other row asks for top-k / top-p: the batch runs the filter path for all rows
    mixed = _batch([1.0] * 64, [0, 5] * 32, [1.0, 0.8] * 32, list(range(64)), True)
    t_plain, lp_plain = sample(logits, plain)
    t_mixed, lp_mixed = sample(logits, mixed)
    assert torch.equal(t_plain[0::2], t_mixed[0::2]) and torch.equal(lp_plain[0::2], lp_mixed[0::2])
    # the filtered rows stay inside their top-5
    top5 = logits.topk(5, dim=-1).indices
    assert all(int(t) in top5[r].tolist() for r, t in zip(range(1, 64, 2), t_mixed[1::2]))
    assert len(set(t_plain.tolist())) > 10  # they are draws, not argmaxes
