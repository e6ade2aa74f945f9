"""atomic_dir and the natix manifest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from natix.quant.artifact import (
    MANIFEST_NAME,
    ArtifactError,
    Manifest,
    SourceRef,
    atomic_dir,
    read_manifest,
    write_manifest,
)


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_dir_success(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not dest.exists()
        (tmp / "a.txt").write_text("x")
    assert (dest / "a.txt").read_text() == "x"
    assert _entries(tmp_path) == ["out"]


def test_atomic_dir_nested_parent_is_created(tmp_path):
    with atomic_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "out" / "f").is_file()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_leaves_nothing(tmp_path, exc):
    with pytest.raises(exc):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"12")
            raise exc()
    assert _entries(tmp_path) == []


def test_atomic_dir_refuses_existing(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("old")
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        with atomic_dir(dest):
            pytest.fail("body must not run")
    assert (dest / "keep").read_text() == "old" and _entries(tmp_path) == ["out"]


def test_atomic_dir_force_replaces_only_when_complete(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(dest, force=True) as tmp:
            (tmp / "new").write_text("new")
            assert (dest / "keep").is_file(), "old output stays until the new one is complete"
            raise ValueError
    assert _entries(dest) == ["keep"] and _entries(tmp_path) == ["out"]
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert _entries(dest) == ["new"] and _entries(tmp_path) == ["out"]


def test_atomic_dir_force_replaces_a_file(tmp_path):
    dest = tmp_path / "out"
    dest.write_text("a file")
    with atomic_dir(dest, force=True) as tmp:
        (tmp / "x").write_text("1")
    assert dest.is_dir()


def test_atomic_dir_gives_files_the_usual_modes(tmp_path):
    """safetensors writes its files 0600; the artifact's files are 0644 like the rest (umask 022)."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_atomic_dir_failure_removes_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "a" / "b" / "out"):
            raise RuntimeError
    assert _entries(tmp_path) == []


def test_atomic_dir_sweeps_a_killed_runs_temp_dir(tmp_path):
    code = ("import os; from natix.quant.artifact import atomic_dir;"
            f"c = atomic_dir({str(tmp_path / 'out')!r}); t = c.__enter__(); (t / 'x').write_text('half'); os._exit(9)")
    subprocess.run([sys.executable, "-c", code])
    (debris,) = [p for p in tmp_path.iterdir() if p.name.startswith(".natix-tmp-out-")]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert _entries(tmp_path) == ["out"] and _entries(tmp_path / "out") == ["a"]


def test_manifest_round_trip(tmp_path):
    m = Manifest(
        scheme="merged",
        base=SourceRef(spec="smollm2-135m", sha256="ab" * 32),
        adapter=SourceRef(spec="/a", sha256="cd" * 32, type="LORA"),
        dtype="bf16",
        details={"merge": {"parity_error": 1e-7}},
    )
    path = write_manifest(tmp_path, m)
    assert path.name == MANIFEST_NAME
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["scheme"] == "merged" and raw["created"]
    assert set(raw["libraries"]) >= {"torch", "transformers", "peft"} and raw["libraries"]["torch"]
    assert raw["natix_version"]
    assert read_manifest(tmp_path) == m


def test_manifest_without_adapter_and_bad_files(tmp_path):
    m = Manifest(scheme="fp8", base=SourceRef(spec="b", sha256="0"), dtype="fp8")
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path).adapter is None
    (tmp_path / MANIFEST_NAME).write_text("{broken")
    with pytest.raises(ArtifactError, match=MANIFEST_NAME):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        read_manifest(tmp_path)


def test_imports_stay_light():
    """`import natix.quant.*` must not pull torch/transformers/peft (CLI --help stays instant)."""
    code = ("import sys, natix.quant, natix.quant.cli, natix.quant.adapters, natix.quant.artifact;"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules];"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
