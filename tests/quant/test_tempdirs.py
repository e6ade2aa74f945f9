"""Owned temporary directories: a live owner's directory is never swept, a dead one's is (and is
reported), directories from before owner files go once an hour stale, parked old outputs are put
back, and the SIGTERM path (remove_owned) cleans up this process's own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from natix.quant.tempdirs import OWNER_FILE, make_owned_dir, remove_owned, sweep_stale

PREFIXES = (".natix-tmp-", ".natix-old-")


def orphan(parent: Path, prefix: str, **record) -> Path:
    """An owned directory whose process has died (exits without cleaning up, like kill -9)."""
    code = ("import os, sys; from pathlib import Path; from natix.quant.tempdirs import make_owned_dir;"
            f"d = make_owned_dir(Path({str(parent)!r}), {prefix!r}, **{record!r}); print(d.path); os._exit(0)")
    return Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def test_live_owner_is_kept_dead_owner_is_swept(tmp_path, caplog):
    mine = make_owned_dir(tmp_path, ".natix-tmp-a-")
    dead = orphan(tmp_path, ".natix-tmp-b-")
    (dead / "model.safetensors").write_bytes(b"0" * 2_000_000)
    with caplog.at_level("WARNING", logger="natix"):
        msgs = sweep_stale(tmp_path, PREFIXES)
    assert not dead.exists() and mine.path.is_dir() and (mine.path / OWNER_FILE).is_file()
    assert len(msgs) == 1 and str(dead) in msgs[0] and "2.0 MB" in msgs[0] and "no longer running" in msgs[0]
    assert msgs[0] in caplog.text
    mine.done()


def test_directories_without_owner_go_when_an_hour_stale(tmp_path):
    young, old = tmp_path / ".natix-tmp-young", tmp_path / ".natix-tmp-old"
    for d in (young, old):
        d.mkdir()
        (d / "f").write_text("x")
    two_hours_ago = time.time() - 7200
    for p in (old / "f", old):
        os.utime(p, (two_hours_ago, two_hours_ago))
    (tmp_path / "unrelated").mkdir()
    sweep_stale(tmp_path, PREFIXES)
    assert young.is_dir() and not old.exists() and (tmp_path / "unrelated").is_dir()


def test_parked_old_output_is_restored_when_its_destination_is_missing(tmp_path):
    parked = orphan(tmp_path, ".natix-old-out-", restore_to="out")
    (parked / "old").mkdir()
    (parked / "old" / "weights").write_text("old model")
    msgs = sweep_stale(tmp_path, PREFIXES)
    assert (tmp_path / "out" / "weights").read_text() == "old model" and not parked.exists()
    assert any("restored" in m for m in msgs)
    # with the destination in place (the swap had finished), the parked copy just goes
    parked = orphan(tmp_path, ".natix-old-out-", restore_to="out")
    (parked / "old").mkdir()
    sweep_stale(tmp_path, PREFIXES)
    assert not parked.exists() and (tmp_path / "out" / "weights").read_text() == "old model"


def test_remove_owned_restores_then_removes(tmp_path):
    (tmp_path / "out").mkdir()
    make_owned_dir(tmp_path, ".natix-tmp-out-")  # the output being built
    parked = make_owned_dir(tmp_path, ".natix-old-out-", restore_to="out")
    os.rename(tmp_path / "out", parked.path / "old")  # killed between the two renames of --force
    remove_owned()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
