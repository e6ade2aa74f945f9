"""The environment a measurement ran in: device, versions, git SHA. Every JSONL row carries it."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=None)  # a run asks once per draw; the checkout does not change
def git_sha(repo: Path | None = None) -> str | None:
    """HEAD (``-dirty`` with uncommitted changes), or ``$GIT_SHA`` where set: a copy of the checkout
    sent to another machine can carry a stale .git (the GPU machine's does)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions and hardware. ``device``: what the engine ran on (``cpu``/``cuda``)."""
    from natix.quant.artifact import library_versions

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **library_versions(("torch", "transformers", "peft", "kvpress", "triton", "natix")),
        "git_sha": git_sha(),
        "device": device,
    }
    if device and device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env
