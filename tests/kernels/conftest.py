"""Kernel tests: on a machine without CUDA, run the Triton kernels in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before the kernel
modules build their kernels (they do so lazily, on first launch), so set it here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def _full_range_progressive(n: int, k: int, group: int):
    """Progressive weights whose level 1 spans the whole uint8 range (s1 up to 255, every q4 that keeps
    q4 * s1 - sz in INT8): the inputs where byte-wide products or packed level-1 words go wrong."""
    from natix.kernels import packing

    s1 = torch.randint(1, 256, (n, k // group), dtype=torch.int32)
    sz = torch.minimum(torch.randint(0, 256, (n, k // group), dtype=torch.int32), 15 * s1 + 127)
    lo = torch.clamp(torch.div(sz - 128 + s1 - 1, s1, rounding_mode="floor"), min=0)  # ceil((sz-128)/s1)
    hi = torch.clamp(torch.div(sz + 127, s1, rounding_mode="floor"), max=15)
    lo_e, hi_e = lo.repeat_interleave(group, 1), hi.repeat_interleave(group, 1)
    q4 = lo_e + (torch.rand(n, k) * (hi_e - lo_e + 1).float()).long().clamp(max=(hi_e - lo_e))
    return packing.pack_progressive(q4.to(torch.uint8), s1.to(torch.uint8), sz.to(torch.uint8), torch.rand(n) + 0.1)


@pytest.fixture
def full_range_progressive():
    return _full_range_progressive
