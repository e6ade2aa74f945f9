"""Batched next-token sampling on the device: per-row temperature / top-k / top-p, raw-model
logprobs, and counter-based randomness.

Each row's uniform draw is a hash of (the request's seed, the sample's index, the token's position
in the output), computed with 32-bit integer arithmetic that CPUs and GPUs do identically. So a
seeded request samples the same tokens whatever batch it runs in, after a preemption, and on any
device (given the same logits), and no per-request generator state exists to carry around.

Greedy rows take the argmax; sampled rows invert the CDF of ``softmax(filter(logits / T))`` at
their draw. Logprobs are of the raw distribution (temperature 1, before top-k/top-p), which is what
``Completion.token_logprobs`` promises. The sort that top-k/top-p need runs only when a row asks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (three xorshift-multiply rounds) on int64 tensors holding uint32 values;
    the multiplier is < 2^31, so no product leaves int64."""
    for _ in range(3):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """float32 draws in (0, 1), one per row, from int64 ``seeds``, sample ``index`` and output ``position``."""
    s = seeds & 0x7FFFFFFFFFFFFFFF
    x = _mix32(_mix32(s & _M32) ^ _mix32((s >> 32) & _M32) ^ (index * 0x9E3779B1 & _M32))
    x = _mix32(x ^ _mix32((position + 0x632BE5AB) & _M32))
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row parameters (device tensors) and host flags saying which paths are needed."""

    temperature: torch.Tensor  # float32 [S]; 0 = greedy
    top_k: torch.Tensor  # int64 [S]; 0 = off
    top_p: torch.Tensor  # float32 [S]; 1 = off
    seeds: torch.Tensor  # int64 [S]
    index: torch.Tensor  # int64 [S]
    position: torch.Tensor  # int64 [S]
    any_sampled: bool
    any_filter: bool


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [S, V]`` -> (tokens int64 [S], their raw logprobs float32 [S])."""
    from natix.kernels.argmax_lse import argmax_lse, argmax_lse_reference

    # one read of the logits, in float32: the kernel on CUDA, the reference elsewhere (also under
    # TRITON_INTERPRET=1: the CPU engine runs references)
    tokens, best, lse = (argmax_lse if logits.is_cuda else argmax_lse_reference)(logits)
    if b.any_sampled:
        logits = logits.float()
        t = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
        scaled = logits / t[:, None]
        if b.any_filter:
            # the filters are decided in sorted order, then mapped back, so the CDF below is always in
            # vocabulary order: a row without filters draws the same token whether or not another row
            # of its batch filters (batch invariance of seeded sampling)
            ranked, order = torch.sort(scaled, dim=-1, descending=True)
            vocab = ranked.shape[-1]
            rank = torch.arange(vocab, device=ranked.device)[None, :]
            k = torch.where(b.top_k > 0, b.top_k, torch.full_like(b.top_k, vocab))
            drop = rank >= k[:, None]
            probs = torch.softmax(ranked.masked_fill(drop, float("-inf")), dim=-1)
            # the nucleus: drop a token once the mass before it reaches top_p (the first always stays)
            before = torch.cumsum(probs, dim=-1) - probs
            drop |= (before >= b.top_p[:, None]) & (rank > 0)
            scaled = scaled.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        u = uniforms(b.seeds, b.index, b.position)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
        tokens = torch.where(b.temperature > 0, pick, tokens)
        chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    else:
        chosen = best - lse
    return tokens, chosen
