"""KV pages for sequences: reference-counted, shared between the samples of one request, and (with
prefix caching) between requests whose prompts start alike.

A sequence's ``block_table`` lists its pages in order; page ``i`` holds its tokens
``[i * page_size, (i + 1) * page_size)``. A page's reference count is the number of sequences whose
table holds it; it returns to the free list at zero. Forking (the n samples of a request after
its prompt's prefill) shares every page of the parent; the last page, if only partly filled, is
copied for each child, since each will write its own next token there (copy-on-write, done at
the fork because every child writes at once).

Prefix caching: a full page is identified by the hash of its tokens chained with the previous
page's hash (so equal hashes mean equal prefixes). Freed pages keep their hash and can be taken
back by a later prompt with the same prefix until the page is reused for something else; the page
holding a prompt's last token is always computed, never taken from the cache (its logits are needed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from natix.engines.natix.kv_cache import SCRATCH_PAGE


class HasBlocks(Protocol):
    block_table: list[int]
    num_cached_tokens: int
    inflight: int  # tokens sampled by launched, not yet collected, decode steps (not in token_ids yet)

    @property
    def token_ids(self) -> list[int]: ...


@dataclass
class _Page:
    ref: int = 0
    hash: Optional[int] = None
    tokens: Optional[tuple[int, ...]] = None


def chain_hash(tokens: Sequence[int], parent: Optional[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError("need at least 2 pages (page 0 is scratch)")
        self.page_size = page_size
        self.num_pages = num_pages
        self.prefix_caching = enable_prefix_caching
        self.pages = [_Page() for _ in range(num_pages)]
        self.free: deque[int] = deque(p for p in range(num_pages) if p != SCRATCH_PAGE)
        self.by_hash: dict[int, int] = {}
        self.cache_hit_tokens = 0

    # ------------------------------------------------------------------------------ accounting
    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.usable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------------------------ pages
    def _take(self, page: Optional[int] = None) -> int:
        if page is None:
            page = self.free.popleft()
            old = self.pages[page]
            if old.hash is not None and self.by_hash.get(old.hash) == page:
                del self.by_hash[old.hash]  # its cached content is about to be overwritten
            self.pages[page] = _Page()
        else:
            self.free.remove(page)  # a cached page with no owner: take it back
        self.pages[page].ref = 1
        return page

    def _release(self, page: int) -> None:
        p = self.pages[page]
        p.ref -= 1
        assert p.ref >= 0, f"page {page} released more often than taken"
        if p.ref == 0:
            self.free.append(page)

    def _cached_page(self, h: int, tokens: tuple[int, ...]) -> Optional[int]:
        page = self.by_hash.get(h)
        if page is None or self.pages[page].tokens != tokens:
            return None
        return page

    def _register(self, page: int, h: int, tokens: tuple[int, ...]) -> None:
        if not self.prefix_caching:
            return
        p = self.pages[page]
        p.hash, p.tokens = h, tokens
        self.by_hash.setdefault(h, page)

    # ------------------------------------------------------------------------------ sequences
    def cached_pages(self, token_ids: Sequence[int]) -> list[int]:
        """The cached pages holding the leading full pages of ``token_ids`` (never the page of
        the last token, whose logits must be computed)."""
        if not self.prefix_caching:
            return []
        h: Optional[int] = None
        found = []
        for i in range((len(token_ids) - 1) // self.page_size):
            toks = tuple(token_ids[i * self.page_size:(i + 1) * self.page_size])
            h = chain_hash(toks, h)
            page = self._cached_page(h, toks)
            if page is None:
                break
            found.append(page)
        return found

    def can_allocate(self, token_ids: Sequence[int], extra_pages: int = 0) -> bool:
        """Whether a sequence of ``token_ids`` (plus ``extra_pages``, e.g. for forks) fits now.
        A cached page another sequence holds costs nothing; one in the free list costs a page."""
        busy = sum(1 for p in self.cached_pages(token_ids) if self.pages[p].ref > 0)
        return self.pages_for(len(token_ids)) + extra_pages - busy <= self.num_free

    def allocate(self, seq: HasBlocks) -> None:
        """Pages for all of ``seq.token_ids``, reusing cached full pages of its prefix; sets
        ``seq.num_cached_tokens`` to the tokens whose KV is already there. Every full page is
        registered at once: the forward that computes it writes each layer's KV before any
        sequence of the same step reads that layer, so a prompt scheduled beside it may share it."""
        assert not seq.block_table, "allocate() on a sequence that already has pages"
        toks_all = seq.token_ids
        hits = self.cached_pages(toks_all)
        for page in hits:
            if self.pages[page].ref > 0:
                self.pages[page].ref += 1
            else:
                self._take(page)
        seq.block_table = list(hits)
        h = self.pages[hits[-1]].hash if hits else None
        for i in range(len(hits), self.pages_for(len(toks_all))):
            toks = tuple(toks_all[i * self.page_size:(i + 1) * self.page_size])
            page = self._take()
            if len(toks) == self.page_size:
                h = chain_hash(toks, h)
                self._register(page, h, toks)
            seq.block_table.append(page)
        seq.num_cached_tokens = len(hits) * self.page_size
        self.cache_hit_tokens += seq.num_cached_tokens

    def fork(self, parent: HasBlocks, child: HasBlocks) -> Optional[tuple[int, int]]:
        """Give ``child`` the parent's pages; returns ``(src, dst)`` when the last, partly filled
        page was copied (the caller copies its contents), else None."""
        assert not child.block_table
        table = list(parent.block_table)
        copy = None
        if len(parent.token_ids) % self.page_size:
            src = table.pop()
            copy = (src, self._take())
        for p in table:
            self.pages[p].ref += 1
        child.block_table = table + ([copy[1]] if copy else [])
        return copy

    def needs_page(self, seq: HasBlocks) -> bool:
        """Whether the position of the token ``seq``'s next decode step feeds (``len(token_ids) - 1``,
        plus its tokens in flight) has no page yet."""
        return len(seq.block_table) * self.page_size < len(seq.token_ids) + seq.inflight

    def can_append(self, seq: HasBlocks) -> bool:
        return not self.needs_page(seq) or self.num_free > 0

    def append_slot(self, seq: HasBlocks) -> None:
        """Before a decode step computes ``seq``'s newest token: give it a page if it needs one;
        the page before it is then full and joins the prefix cache."""
        if not self.needs_page(seq):
            return
        i = len(seq.block_table) - 1
        if i >= 0 and self.pages[seq.block_table[i]].hash is None:
            toks = tuple(seq.token_ids[i * self.page_size:(i + 1) * self.page_size])
            parent = self.pages[seq.block_table[i - 1]].hash if i > 0 else None
            if i == 0 or parent is not None:
                self._register(seq.block_table[i], chain_hash(toks, parent), toks)
        seq.block_table.append(self._take())

    def free_seq(self, seq: HasBlocks) -> None:
        for p in reversed(seq.block_table):
            self._release(p)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def forget(self, pages: Sequence[int]) -> None:
        """Drop ``pages`` from the prefix cache (their contents were never computed: a failed step)."""
        for page in pages:
            p = self.pages[page]
            if p.hash is not None and self.by_hash.get(p.hash) == page:
                del self.by_hash[p.hash]
            p.hash = p.tokens = None
