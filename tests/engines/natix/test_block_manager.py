"""Pages: reference counts, forks with copy-on-write of the partial page, prefix caching, scratch page."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from natix.engines.natix.block_manager import BlockManager


@dataclass
class S:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    inflight: int = 0


def test_allocate_append_free_and_scratch_page_is_never_given():
    bm = BlockManager(num_pages=6, page_size=4, enable_prefix_caching=False)
    assert bm.usable_pages == 5 and bm.num_free == 5
    s = S(list(range(6)))
    assert bm.can_allocate(s.token_ids)
    bm.allocate(s)
    assert len(s.block_table) == 2 and 0 not in s.block_table and s.num_cached_tokens == 0
    for t in range(6, 13):  # decode: the newest token needs a page at positions 8 and 12
        s.token_ids.append(t)
        assert bm.can_append(s)
        bm.append_slot(s)
        assert len(s.block_table) * 4 >= len(s.token_ids)
    assert len(s.block_table) == 4 and bm.num_free == 1
    bm.free_seq(s)
    assert bm.num_free == 5 and s.block_table == []


def test_fork_shares_full_pages_and_copies_the_partial_one():
    bm = BlockManager(num_pages=10, page_size=4)
    parent = S(list(range(10)))  # pages: [0..3] [4..7] [8, 9]
    bm.allocate(parent)
    kids = [S(list(parent.token_ids)) for _ in range(3)]
    copies = [bm.fork(parent, k) for k in kids]
    for k, c in zip(kids, copies):
        assert k.block_table[:2] == parent.block_table[:2]  # shared
        assert c == (parent.block_table[2], k.block_table[2]) and k.block_table[2] != parent.block_table[2]
    assert bm.pages[parent.block_table[0]].ref == 4
    assert bm.num_free == 9 - 3 - 3
    for k in kids:
        bm.free_seq(k)
    assert bm.pages[parent.block_table[0]].ref == 1
    # a prompt that fills its last page exactly: nothing to copy
    p2 = S(list(range(100, 108)))
    bm.allocate(p2)
    k2 = S(list(p2.token_ids))
    assert bm.fork(p2, k2) is None and k2.block_table == p2.block_table


def test_prefix_cache_hits_and_the_last_token_page_is_always_computed():
    bm = BlockManager(num_pages=12, page_size=4)
    a = S(list(range(10)))
    bm.allocate(a)
    b = S(list(range(10)) + [99, 98])  # same first 2 full pages
    assert len(bm.cached_pages(b.token_ids)) == 2
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.pages[a.block_table[0]].ref == 2
    # an identical 8-token prompt: only its first page can come from the cache (page 2 holds the last token)
    c = S(list(range(8)))
    assert len(bm.cached_pages(c.token_ids)) == 1
    # freed pages stay cached until reused
    bm.free_seq(a)
    bm.free_seq(b)
    d = S(list(range(10)))
    bm.allocate(d)
    assert d.num_cached_tokens == 8 and bm.cache_hit_tokens == 16
    # a different prefix shares nothing
    e = S([7] + list(range(1, 10)))
    assert bm.cached_pages(e.token_ids) == []


def test_decode_filled_pages_join_the_cache():
    bm = BlockManager(num_pages=12, page_size=4)
    a = S(list(range(3)))
    bm.allocate(a)
    for t in range(3, 9):
        a.token_ids.append(t)
        bm.append_slot(a)
    b = S(list(range(9)))
    assert len(bm.cached_pages(b.token_ids)) == 2  # both pages filled by decode are reusable


def test_can_allocate_counts_busy_cached_pages_as_free():
    bm = BlockManager(num_pages=5, page_size=4)  # 4 usable
    a = S(list(range(9)))
    bm.allocate(a)  # 3 pages
    assert bm.num_free == 1
    # 5 tokens = 2 pages, but page 0 is a cache hit another sequence holds: 1 free page suffices
    assert bm.can_allocate(list(range(5)))
    assert not bm.can_allocate(list(range(100, 105)))
    assert not bm.can_allocate(list(range(5)), extra_pages=1)


def test_release_twice_is_a_bug():
    bm = BlockManager(num_pages=3, page_size=4)
    a = S([1, 2])
    bm.allocate(a)
    p = a.block_table[0]
    bm.free_seq(a)
    with pytest.raises(AssertionError):
        bm._release(p)


def test_kv4_channel_groups_in_the_paged_cache():
    """KV4 channel groups: 8 bytes per token, head and extra group (fp16 scale and zero, keys and
    values); every layer's cache has them; a group count the kernels cannot take is refused."""
    import torch

    from natix.engines.natix.kv_cache import PagedKVCache, bytes_per_page

    assert bytes_per_page("int4", 1, 1, 128, 1, torch.bfloat16) == 136
    assert bytes_per_page("int4", 1, 1, 128, 1, torch.bfloat16, groups=4) == 160
    for groups in (1, 2, 4):
        kv = PagedKVCache("int4", 3, 2, 2, 64, 8, torch.float32, "cpu", groups)
        assert kv.nbytes == 3 * bytes_per_page("int4", 2, 2, 64, 8, torch.float32, groups)
        assert all(c.num_groups == groups and c.group_size == 64 // groups for c in kv.layer_caches)
    with pytest.raises(ValueError, match="KV4 group size"):
        PagedKVCache("int4", 3, 2, 2, 64, 8, torch.float32, "cpu", 8)  # groups of 8 channels
