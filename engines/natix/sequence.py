"""Requests and their sequences (one per sample), as the scheduler and the engine see them."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Optional

from natix.engines.base import SamplingSpec

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Sample ``index`` of ``request``: its tokens (prompt, then generated), its pages, its output.

    The KV cache holds the first ``len(token_ids) - 1`` tokens while running (the newest token is
    computed by the next decode step; with ``inflight`` tokens still on the device, those too);
    ``num_cached_tokens`` counts those a prefill can skip."""

    request: "Request"
    index: int
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    # streaming: tokens / text already handed out, the incremental detokenizer's offsets
    sent_tokens: int = 0
    text: str = ""
    sent_text: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    preemptions: int = 0
    #: tokens sampled by decode steps that are launched but not collected (async scheduling); the
    #: next step's position is ``len(token_ids) - 1 + inflight``
    inflight: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Request:
    """One ``add_request``: a prompt and its SamplingSpec; ``seqs`` holds its ``spec.n`` samples.
    Sample 0 prefills the prompt; the others are forked from it after that prefill."""

    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    seed: int
    arrival: float
    stream_text: bool = True
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    aborted: bool = False
    started: Optional[float] = None  # when its first prefill was scheduled

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
