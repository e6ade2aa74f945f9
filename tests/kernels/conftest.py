"""Kernel tests: on a machine without CUDA, run the Triton kernels in the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before the kernel
modules build their kernels (they do so lazily, on first launch), so set it here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

