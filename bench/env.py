"""The environment a measurement ran in: device, versions, git SHA. Every JSONL row carries it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def git_sha(repo: Path | None = None) -> str | None:
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
    import importlib.metadata as md

    def ver(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": ver("torch"), "transformers": ver("transformers"), "peft": ver("peft"),
        "kvpress": ver("kvpress"), "triton": ver("triton"), "natix": ver("natix"),
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
