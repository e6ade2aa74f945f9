"""The engine's paged KV cache: one allocation for all layers, UINT4 (KV4) or 16-bit.

Each kind of tensor is one allocation with a leading layer dimension, so copying pages between
sequences (copy-on-write of a shared partial page) is one indexed copy per tensor kind, whatever the
depth, and each layer's slice is a contiguous tensor in the layout the kernels read:

- ``int4``: `natix.kernels.kv4_cache.KV4Cache` per layer (codes [P, H_kv, page, D/2] uint8, fp16
  scale/zero [P, H_kv, page, NG] for keys and values, NG channel groups per head): ``D + 8 NG``
  bytes per token and head for keys and values together; for D = 128, 136 bytes with one group and
  160 with groups of 32 channels, against 512 in bf16 (3.76x / 3.2x the tokens in the same memory).
- ``none``: `natix.kernels.paged_attention` pages [P, H_kv, page, D] in the model dtype.

Page 0 is never handed to a sequence: padded rows of a captured decode batch write there.
"""
from __future__ import annotations

from typing import Any

import torch

from natix.kernels.kv4_cache import KV4Cache, kv4_gather, num_groups

SCRATCH_PAGE = 0


def bytes_per_page(kind: str, layers: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
                   groups: int = 1) -> int:
    """Bytes one page costs over all layers (keys and values); ``groups``: KV4 channel groups per head."""
    if kind == "int4":
        per_token_head = (head_dim // 2 + 2 * 2 * groups) * 2
    else:
        per_token_head = head_dim * torch.finfo(dtype).bits // 8 * 2
    return layers * kv_heads * page_size * per_token_head


class PagedKVCache:
    """``num_pages`` pages of ``page_size`` tokens for every layer (see module docstring)."""

    def __init__(self, kind: str, num_pages: int, layers: int, kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: Any, groups: int = 1) -> None:
        if kind not in ("int4", "none"):
            raise ValueError(f"KV cache kind must be int4 or none, got {kind!r}")
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is scratch), got {num_pages}")
        self.kind, self.num_pages, self.layers = kind, num_pages, layers
        self.kv_heads, self.head_dim, self.page_size, self.dtype = kv_heads, head_dim, page_size, dtype
        self.groups = groups if kind == "int4" else 1
        shape = (layers, num_pages, kv_heads, page_size)
        if kind == "int4":
            codes = lambda: torch.zeros(shape + (head_dim // 2,), dtype=torch.uint8, device=device)  # noqa: E731
            num_groups(head_dim, head_dim // groups)  # a group size the kernels take
            meta = lambda: torch.zeros(shape + (groups,), dtype=torch.float16, device=device)  # noqa: E731
            self.tensors = (codes(), codes(), meta(), meta(), meta(), meta())
            self.layer_caches = [KV4Cache(*(t[i] for t in self.tensors)) for i in range(layers)]
        else:
            self.tensors = tuple(torch.zeros(shape + (head_dim,), dtype=dtype, device=device) for _ in range(2))
            self.layer_caches = [(self.tensors[0][i], self.tensors[1][i]) for i in range(layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Page ``dst[i]`` of every layer becomes a copy of page ``src[i]``."""
        if not src:
            return
        dev = self.tensors[0].device
        s = torch.tensor(src, dtype=torch.long, device=dev)
        d = torch.tensor(dst, dtype=torch.long, device=dev)
        for t in self.tensors:
            t[:, d] = t[:, s]

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token slot of ``pages`` (a long tensor on the cache's device) of
        ``layer``, dequantized: two [len(pages) * page_size, H_kv, D] tensors in the cache's model dtype
        (KV4: as its decode attention reads them)."""
        c = self.layer_caches[layer]
        if self.kind == "int4":
            return kv4_gather(c, pages, self.dtype)
        # [p, H, S, D] -> [p*S, H, D]
        return (c[0][pages].permute(0, 2, 1, 3).reshape(-1, self.kv_heads, self.head_dim),
                c[1][pages].permute(0, 2, 1, 3).reshape(-1, self.kv_heads, self.head_dim))
