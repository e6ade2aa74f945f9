"""Artifacts on disk: atomic directory writes and the natix manifest.

An artifact is a directory (safetensors + ``config.json`` + tokenizer + ``natix_manifest.json``).
It either exists complete or not at all: :func:`atomic_dir` builds it in a hidden temp directory
beside the destination (same filesystem, so the final ``rename`` is atomic) and removes the temp
directory on any failure, Ctrl-C and SIGTERM included; one left by ``kill -9`` is removed by the
next run (:mod:`natix.quant.tempdirs`).

The manifest, never the directory name, says what an artifact is (``scheme``: ``merged`` now;
``fp8``/``gptq``/``w4a8kv4`` from the export step), where it came from (base and adapter hashes)
and which library versions made it. Scheme-specific details (quant config, calibration, merge
parity) go in ``details`` so this schema stays the same for every exporter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from natix.quant.errors import ArtifactError
from natix.quant.tempdirs import make_owned_dir, sweep_stale

MANIFEST_NAME = "natix_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_TMP_PREFIX = ".natix-tmp-"
_OLD_PREFIX = ".natix-old-"
TMP_FILE_SUFFIX = ".natix-tmp"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "safetensors")


def _refuse_existing(dest: Path) -> None:
    raise ArtifactError(f"output {dest} already exists; pass --force to replace it")


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories it created, outermost first."""
    created: list[Path] = []
    for d in reversed((directory, *directory.parents)):
        if not d.exists():
            d.mkdir()
            created.append(d)
    return created


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def atomic_dir(dest: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``dest``; on success rename it to ``dest``.

    Enter it *before* the slow work: it is the writability check (the temp directory is created
    on entry, so a read-only or missing location fails at once, not after an hour of
    quantization). ``dest`` existing is refused up front unless ``force``; with ``force`` the old
    directory is replaced only once the new one is complete, so a failed run keeps it. On any
    exception (``KeyboardInterrupt`` and the CLIs' SIGTERM included) the temp directory, and any
    parent directory this call created, are removed and the exception propagates. A ``kill -9``
    leaves the temp directory behind; the next atomic_dir in the same place removes it
    (:func:`natix.quant.tempdirs.sweep_stale`). Files get the usual modes (0644 under umask 022:
    safetensors writes its files 0600).
    """
    dest = Path(dest)
    if dest.exists() and not force:
        _refuse_existing(dest)
    created: list[Path] = []
    try:
        created = _make_parents(dest.parent)
        sweep_stale(dest.parent, (_TMP_PREFIX, _OLD_PREFIX))
        owned = make_owned_dir(dest.parent, f"{_TMP_PREFIX}{dest.name}-", building=dest.name)
    except OSError as e:
        _remove_empty(created)
        raise ArtifactError(f"cannot write the output {dest}: {e.strerror or e} ({e.filename or dest.parent})") from e
    tmp = owned.path
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the artifact should be shareable
        yield tmp
        _shareable(tmp)
        owned.release()  # no owner file in the artifact
        _commit(tmp, dest, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        owned.done()


def _shareable(tmp: Path) -> None:
    """Give every file and directory under ``tmp`` the modes a plain write would (0666/0777 less the umask)."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


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
        # Park the old one under a temp name so there is never a moment with neither; if we die
        # between the renames, the SIGTERM handler or the next sweep puts it back (restore_to).
        parked = make_owned_dir(dest.parent, f"{_OLD_PREFIX}{dest.name}-", restore_to=dest.name)
        old = parked.path
        try:
            os.rename(dest, old / "old")
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old / "old", dest)  # put it back
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
            parked.done()
    else:  # a file or symlink in the way: --force means replace it
        dest.unlink()
        os.rename(tmp, dest)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all: a hidden temp file beside it, then ``os.replace``
    (a kill leaves the old file intact; :data:`TMP_FILE_SUFFIX` names the temp file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_FILE_SUFFIX}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        for key, kind in (("scheme", str), ("dtype", str), ("details", dict)):
            if not isinstance(d.get(key), kind):
                raise ArtifactError(f"{MANIFEST_NAME}: {key!r} must be a {kind.__name__}, got {d.get(key)!r:.60}")
        d["base"] = _source_ref(d["base"], "base")
        d["adapter"] = _source_ref(d["adapter"], "adapter") if d.get("adapter") else None
        return cls(**d)


def _source_ref(d: Any, key: str) -> SourceRef:
    if (not isinstance(d, dict) or not isinstance(d.get("spec"), str) or not isinstance(d.get("sha256"), str)
            or not isinstance(d.get("type"), (str, type(None)))):
        raise ArtifactError(f"{MANIFEST_NAME}: {key!r} must be a mapping with 'spec' and 'sha256' strings, got {d!r:.80}")
    return SourceRef(**d)


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
