"""Launch compiled Triton kernels through their C launcher, without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **constexprs)`` binds every argument, builds the specialization key, looks the
compiled kernel up and only then launches: measured on the H200 machine's host, ~30 µs per launch
(reports/engine.md), several times the GPU time of a decode-sized kernel, and paid by every launch
outside CUDA graphs (prefill, eager paths). :class:`Launcher` keeps, per specialization, the compiled
kernel's launcher, function handle and metadata, and calls the launcher directly.

Correctness rests on reproducing Triton's specialization: a compiled kernel is only valid for
arguments with the same properties it was compiled for, so each call computes the key Triton uses
(per tensor: element type and whether the pointer is 16-byte aligned; per integer: equal to 1,
divisible by 16, needs 64 bits)
and a new key goes through the normal JIT path once. The launcher's argument layout (whether
constexpr values follow the runtime arguments; it changed across Triton releases) is read off one
normal launch, and anything unexpected (launch hooks registered, e.g. by a profiler; a layout that
does not match) makes the launcher fall back to the normal path for good. Launch metadata and hooks
are passed as None, which the launcher skips. Under ``TRITON_INTERPRET=1`` it always falls back.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch


def _key(args: tuple) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):  # a kernel is compiled for its pointers' element types too
            out.append((a.dtype, a.data_ptr() & 15 == 0))
        elif type(a) is int:
            out.append((a == 1, a & 15 == 0, -2**31 <= a < 2**31))
        else:
            out.append(None)
    return tuple(out)


class Launcher:
    """``Launcher(jit_fn, **constexprs_and_options)(grid, *runtime_args)`` launches ``jit_fn`` like
    ``jit_fn[grid](*runtime_args, **constexprs_and_options)``. Runtime arguments must come first
    in the kernel's signature, constexprs after (the convention of natix's kernels)."""

    def __init__(self, jit_fn: Any, **kwargs: Any) -> None:
        self.fn = jit_fn
        self.kwargs = kwargs
        self.direct = os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("NATIX_DIRECT_LAUNCH", "1") != "0"
        self._compiled: dict[tuple, tuple[Callable, Any, Any, tuple]] = {}
        self._device: Optional[int] = None
        self.why_not_direct = "" if self.direct else "TRITON_INTERPRET=1 or NATIX_DIRECT_LAUNCH=0"

    def __call__(self, grid: tuple, *args: Any) -> None:
        if not self.direct:
            self.fn[grid](*args, **self.kwargs)
            return
        self.keyed(args, grid + (1,) * (3 - len(grid)), *args)

    def keyed(self, key_args: tuple, grid: tuple, *args: Any) -> None:
        """As ``__call__`` with the specialization key computed over ``key_args`` only: for a caller
        whose other arguments keep their properties (element types, 16-byte alignment, the class of
        each integer) for the life of this launcher, e.g. a layer's weights. ``grid`` has three entries."""
        if not self.direct:
            self.fn[grid](*args, **self.kwargs)
            return
        key = _key(key_args)
        hit = self._compiled.get(key)
        if hit is None:
            self._learn(key, grid, args)
            return
        run, function, meta, extra = hit
        run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self._device), function, meta, None, None,
            None, *args, *extra)

    def _learn(self, key: tuple, grid: tuple, args: tuple) -> None:
        """Compile without launching (``warmup``), then launch once through the JIT while recording
        what it hands the C launcher, to learn the argument layout. Exactly one launch: kernels that
        update their inputs in place (a residual add, RoPE) must not run twice."""
        try:
            kernel = self.fn.warmup(*args, grid=grid, **self.kwargs)
        except (AttributeError, TypeError):
            kernel = None
        if kernel is None:
            self.direct = False
            self.why_not_direct = "JITFunction.warmup is unavailable"
            self.fn[grid](*args, **self.kwargs)
            return
        try:
            from triton import knobs

            # Triton >= 3.4 keeps the hooks in (usually empty) HookChain objects
            hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
            hooked = any(h is not None and getattr(h, "calls", True) for h in hooks)
        except (ImportError, AttributeError):
            hooked = False
        attr = "_run" if isinstance(getattr(type(kernel), "run", None), property) else "run"
        real = getattr(kernel, "run", None)  # (a property on Triton >= 3.5: loads the module on first use)
        if hooked or real is None:
            self.direct = False
            self.why_not_direct = "launch hooks are set" if hooked else f"no launcher on {type(kernel).__name__}"
            self.fn[grid](*args, **self.kwargs)
            return
        seen: list[tuple] = []

        def record(*a: Any) -> Any:
            seen.append(a)
            return real(*a)

        setattr(kernel, attr, record)
        try:
            self.fn[grid](*args, **self.kwargs)
        finally:
            setattr(kernel, attr, real)
        if len(seen) != 1 or len(seen[0]) < 9 + len(args) or any(
                x is not y for x, y in zip(seen[0][9:9 + len(args)], args) if isinstance(y, torch.Tensor)):
            self.direct = False
            self.why_not_direct = (f"unexpected launcher call layout: {len(seen)} calls, "
                                   f"{len(seen[0]) if seen else 0} arguments for {len(args)} runtime arguments")
            return
        call = seen[0]
        self._device = torch.cuda.current_device()
        self._compiled[key] = (real, call[4], call[5], tuple(call[9 + len(args):]))
