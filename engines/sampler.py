"""Next-token choice from logits: greedy, or temperature + top-k + top-p sampling.

Pure torch, one function per step of the decode loop. The returned log-probabilities are those
of the *raw* model distribution (``log_softmax`` at temperature 1, before top-k/top-p), which is
what ``Completion.token_logprobs`` promises and what confidence-weighted voting needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from natix.engines.base import SamplingSpec


def filter_logits(logits: "torch.Tensor", top_k: int, top_p: float) -> "torch.Tensor":
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus.

    logits: (B, V) float. Returns a new (B, V) tensor. ``top_k == 0`` and ``top_p == 1`` are off.
    The most likely token always survives, so a row is never fully masked.
    """
    import torch

    out = logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass *before* it already reaches top_p: the nucleus is the
        # smallest prefix whose mass is >= top_p (the first token is always kept).
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: "torch.Tensor", spec: "SamplingSpec", generator: "torch.Generator | None"
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Choose one token per row.

    logits: (B, V), any float dtype (upcast to fp32 here). Returns ``(tokens, logprobs)``, both
    (B,): token ids (int64) and their log-probability under ``log_softmax(logits)``.
    ``generator`` makes sampling reproducible; greedy ignores it.
    """
    import torch

    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if spec.greedy:
        tokens = torch.argmax(logits, dim=-1)
    else:
        scaled = filter_logits(logits / spec.temperature, spec.top_k, spec.top_p)
        probs = torch.softmax(scaled, dim=-1)
        # Inverse-CDF draw: one uniform per row. torch.multinomial draws an exponential per
        # vocabulary entry (49k per row), which was 18% of CPU decode time at batch 128.
        cdf = probs.cumsum(dim=-1)
        u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    chosen = raw_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen
