"""Artifacts on disk: atomic directory writes and the natix manifest.

An artifact is a directory (safetensors + ``config.json`` + tokenizer + ``natix_manifest.json``).
It either exists complete or not at all: :func:`atomic_dir` builds it in a hidden temp directory
beside the destination (same filesystem, so the final ``rename`` is atomic) and removes the temp
directory on any failure, Ctrl-C included.

The manifest, never the directory name, says what an artifact is (``scheme``: ``merged`` now;
``fp8``/``gptq``/``w4a8kv4`` from the export step), where it came from (base and adapter hashes)
and which library versions made it. Scheme-specific details (quant config, calibration, merge
parity) go in ``details`` so this schema stays the same for every exporter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from natix.quant.errors import ArtifactError

MANIFEST_NAME = "natix_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_TMP_PREFIX = ".natix-tmp-"
_OLD_PREFIX = ".natix-old-"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "safetensors")


def _refuse_existing(dest: Path) -> None:
    raise ArtifactError(f"output {dest} already exists; pass --force to replace it")


@contextmanager
def atomic_dir(dest: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``dest``; on success rename it to ``dest``.

    ``dest`` existing is refused up front (before any work) unless ``force``; with ``force`` the
    old directory is replaced only once the new one is complete, so a failed run keeps it.
    On any exception (including ``KeyboardInterrupt``) the temp directory is removed and the
    exception propagates.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        _refuse_existing(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the artifact should be shareable
        yield tmp
        _commit(tmp, dest, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, dest: Path, *, force: bool) -> None:
    """Move ``tmp`` to ``dest``; with ``force`` swap out an existing ``dest`` first."""
    if not dest.exists() and not dest.is_symlink():
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists():
                raise
            # someone created dest while we worked: fall through to the replace/refuse path
    if not force:
        _refuse_existing(dest)
    if dest.is_dir() and not dest.is_symlink():
        # Park the old one under a temp name so there is never a moment with neither.
        old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{dest.name}-", dir=dest.parent))
        os.rename(dest, old / "old")
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old / "old", dest)  # put it back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file or symlink in the way: --force means replace it
        dest.unlink()
        os.rename(tmp, dest)


def _umask() -> int:
    old = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(old)
    return old


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str | None]:
    """Installed versions from package metadata (no imports, so this stays cheap)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def natix_version() -> str:
    try:
        return metadata.version("natix")
    except metadata.PackageNotFoundError:  # running from a checkout without install
        return "0+unknown"


@dataclass(frozen=True)
class SourceRef:
    """Where an input came from: ``spec`` as the user gave it, plus a content hash."""

    spec: str
    sha256: str
    type: str | None = None  # adapters: the peft type (LORA, IA3, ...); bases: None


@dataclass(frozen=True)
class Manifest:
    """Contents of ``natix_manifest.json``. ``details`` holds scheme-specific, JSON-able data."""

    scheme: str
    base: SourceRef
    dtype: str
    adapter: SourceRef | None = None
    details: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    natix_version: str = field(default_factory=natix_version)
    libraries: dict[str, str | None] = field(default_factory=library_versions)
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("schema_version") != MANIFEST_SCHEMA_VERSION:
            raise ArtifactError(f"unsupported {MANIFEST_NAME} schema_version {d.get('schema_version')!r}; "
                                f"this natix reads version {MANIFEST_SCHEMA_VERSION}")
        d = dict(d)
        d["base"] = SourceRef(**d["base"])
        d["adapter"] = SourceRef(**d["adapter"]) if d.get("adapter") else None
        return cls(**d)


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write ``natix_manifest.json`` into ``directory`` and return its path."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """Read an artifact's manifest; :class:`ArtifactError` names the file if it is missing or bad."""
    path = Path(directory) / MANIFEST_NAME
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except ArtifactError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"cannot read artifact manifest {path}: {e}") from e
