"""Checks every command runs before its slow work: an output never overlaps an input, an output
location is writable, a device exists.

An output that *is* an input, *contains* one (``--force`` would delete it) or lies *inside* an
input directory (it would change that input) is refused whatever the flags say: a tool that
quantizes an adapter must never be the reason the adapter is gone. Paths are compared after
resolving symlinks and ``..``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from natix.quant.errors import UserError

Inputs = Iterable[tuple[str, "str | Path | None"]]


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(p))


def check_text(value: str, what: str) -> str:
    """``value`` as given, or :class:`UserError` when it holds bytes that are not UTF-8 (a shell
    passes them through as lone surrogates; tokenizers, safetensors and JSON cannot store them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} {ascii(value)} is not valid UTF-8; use a name made of UTF-8 text") from None
    return value


def check_no_overlap(out: str | Path, inputs: Inputs, *, flag: str = "--out", replaces: bool = True) -> None:
    """Raise :class:`UserError` if ``out`` is, contains, or is inside any existing input
    (``inputs``: (what it is, path) pairs; missing paths and None are skipped). ``replaces=False``:
    ``out`` is a directory files are written into, never removed, so containing an input is fine."""
    o = _real(out)
    for what, path in inputs:
        if path is None or not os.path.lexists(path):
            continue
        i = _real(path)
        if o == i:
            raise UserError(f"{flag} {out} is the {what} {path}; natix never writes over an input, "
                            "--force or not: choose another output")
        if replaces and i.is_relative_to(o):
            raise UserError(f"{flag} {out} contains the {what} {path}; replacing it would delete that input, "
                            "so it is refused, --force or not: choose another output")
        if i.is_dir() and o.is_relative_to(i):
            raise UserError(f"{flag} {out} is inside the {what} directory {path}; natix does not write into "
                            "its inputs: choose an output outside it")


def check_writable_dir(directory: str | Path, *, what: str) -> None:
    """Raise :class:`UserError` unless files can be created in ``directory`` (or, if it does not
    exist yet, in its nearest existing ancestor, where it would be made). A real probe (create and
    delete a file), so it also catches read-only filesystems and immutable directories."""
    d = Path(directory)
    while not d.exists():
        if d.parent == d:
            break
        d = d.parent
    if not d.is_dir():
        raise UserError(f"{what} {directory}: {d} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".natix-probe-", dir=d)
    except OSError as e:
        raise UserError(f"{what} {directory} is not writable: {e.strerror or e} ({d})") from e
    os.close(fd)
    os.unlink(probe)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def is_device(value: Any) -> bool:
    """Whether ``value`` names a device natix runs on: auto, cpu, cuda, cuda:N or mps."""
    return isinstance(value, str) and _DEVICE.fullmatch(value) is not None


def check_device(device: str, *, flag: str = "--device") -> None:
    """Raise :class:`UserError` if ``device`` (see :func:`is_device`) is not present on this
    machine. Imports torch only for cuda/mps."""
    if not is_device(device):
        raise UserError(f"{flag} {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise UserError(f"{flag} {device}: no CUDA device is available (torch {torch.__version__}, {build}); "
                            "use cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} mps: the MPS backend is not available here; use cpu or auto")
