"""The ``natix`` extension field: test-time compute in the same call.

``"natix": {"strategy": "maj@8" | "bo8:verifier" | "adaptive@16:beta", "task": "chain_sum"}``
draws the strategy's samples through the server's engine loop (so they batch with everyone
else's traffic), lets the strategy decide, and answers with the chosen completion as the one
choice plus a ``natix`` object: the answer, its vote share, the chosen sample's score (best-of-N),
the votes, and the samples spent of the budget. The strategies are natix.scaling's, parsed from
the same spec strings as ``natix-bench``.

``task`` gives the answer extractor (the task's kind) and, for ``boN:verifier``, the verifier:
the task finds the problem in the prompt (:meth:`natix.bench.tasks.Task.item_from_text`) and
scores each sample without a gold answer. Extractors are the registered names only (no
``regex:`` from the network: a client's pattern could take a thread hostage).
"""

from __future__ import annotations

from typing import Any

from natix.engines.base import SamplingSpec
from natix.engines.serve.protocol import APIError, NatixOptions

__all__ = ["plan_strategy", "summary"]


def plan_strategy(opts: NatixOptions, prompt: str, base: SamplingSpec, max_n: int) -> Any:
    """The :class:`~natix.scaling.strategy.Strategy` the request asks for, validated against
    ``base`` (its sampling) and ``max_n`` (the server's limit on samples); 400s name the field."""
    from natix.scaling import available_extractors, parse_strategy

    task = None
    if opts.task is not None:
        from natix.bench.tasks import get_task

        try:
            task = get_task(opts.task)
        except ValueError as e:
            raise APIError(400, str(e), param="natix.task") from e
    extractor = opts.extractor or (task.kind if task is not None else "number")
    if extractor not in available_extractors():
        raise APIError(400, f"unknown extractor {extractor!r}; available: {', '.join(available_extractors())}",
                       param="natix.extractor")
    verifier = None
    if task is not None and task.has_verifier:
        item = task.item_from_text(prompt)
        if item is not None:
            verifier = lambda _prompt, text: task.verify(item, text)  # noqa: E731
    try:
        strategy = parse_strategy(opts.strategy, extractor=extractor, verifier=verifier)
    except ValueError as e:
        msg = str(e)
        if "verifier" in opts.strategy and verifier is None:
            msg = (f"{opts.strategy!r} needs a verifier: give a task that has one and a prompt that poses "
                   f"one of its problems ({msg})")
        raise APIError(400, msg, param="natix.strategy") from e
    if strategy.budget > max_n:
        raise APIError(400, f"{strategy.spec()} draws up to {strategy.budget} samples; this server allows "
                       f"{max_n}", param="natix.strategy")
    try:
        strategy.sampling_spec(base)
    except ValueError as e:
        raise APIError(400, str(e), param="temperature") from e
    return strategy


def summary(strategy: Any, result: Any, task: str | None) -> dict[str, Any]:
    """The response's ``natix`` object for one decided prompt."""
    return {
        "strategy": strategy.spec(),
        "task": task,
        "answer": result.answer,
        "vote_share": result.confidence,
        "score": result.extra.get("best_score"),  # best-of-N's chosen sample's score
        "votes": dict(result.votes),
        "answers": list(result.answers),
        "scores": list(result.scores),
        "samples_spent": result.samples_spent,
        "budget": result.budget,
        "stopped_early": result.stopped_early,
    }
