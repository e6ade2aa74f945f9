"""Continuous batching: which sequences run in the next step, prefill or decode.

Every step is either a prefill (waiting prompts admitted up to a token budget and the batch size)
or a decode of every running sequence (one token each), so requests join and leave the batch
between any two steps. Prefills go first when one fits: a new request's first token is worth more
than one more token of a running one, and the admission limits keep decode batches full.

Admission reserves what a request needs right away: its prompt's pages and, for ``n`` samples, a
copy of the prompt's last partial page per extra sample (the samples are forked from the first one
right after its prefill; :meth:`Scheduler.fork`). When a decode step needs a page and none is free,
the newest running sequence is preempted: its pages are freed and it waits at the head of the queue
to be recomputed (prompt and generated tokens) by a later prefill, so no request is ever lost.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from natix.engines.natix.block_manager import BlockManager
from natix.engines.natix.sequence import Request, Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req.seqs[0])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _new_rows(self, seq: Sequence) -> int:
        """Rows of the decode batch admitting ``seq`` adds (a request's first prefill brings all n)."""
        req = seq.request
        return len(req.seqs) if not req.forked and seq.index == 0 else 1

    def _fork_pages(self, seq: Sequence) -> int:
        req = seq.request
        if req.forked or seq.index != 0 or len(req.seqs) == 1:
            return 0
        return (len(req.seqs) - 1) if len(seq.token_ids) % self.blocks.page_size else 0

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next step's sequences and whether it is a prefill ([] when there is nothing to run)."""
        seqs: list[Sequence] = []
        tokens = 0
        rows = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            add_rows = self._new_rows(seq)
            if rows + add_rows > self.max_num_seqs:
                break
            cached = len(self.blocks.cached_pages(seq.token_ids)) * self.blocks.page_size
            new_tokens = len(seq.token_ids) - cached
            if seqs and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq.token_ids, self._fork_pages(seq)):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            seqs.append(seq)
            tokens += len(seq.token_ids) - seq.num_cached_tokens
            rows += add_rows
        if seqs:
            self.running.extend(seqs)
            return seqs, True
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted while making room for an earlier one
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                scheduled.append(seq)
        return scheduled, False

    def fork(self, parent: Sequence) -> list[tuple[int, int]]:
        """After ``parent``'s prefill: its siblings share its pages and join the batch. Returns
        the (src, dst) page copies the runner must make before their first decode."""
        req = parent.request
        copies = []
        for child in req.seqs[1:]:
            if child.finished:  # aborted meanwhile
                continue
            copy = self.blocks.fork(parent, child)
            if copy is not None:
                copies.append(copy)
            child.status = Status.RUNNING
            self.running.append(child)
        req.forked = True
        return copies

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, now: float, error: Optional[str] = None) -> None:
        """Take ``seq`` out of the queues (wherever it is) and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = now
