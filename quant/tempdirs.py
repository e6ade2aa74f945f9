"""Temporary directories that record their owner, and the sweep that removes those whose owner died.

natix builds every output beside its destination in a hidden temporary directory (an artifact in
the making, an old artifact parked during ``--force``, a GGUF conversion in the model cache) and
renames it into place when complete. A crash, SIGTERM or ``kill -9`` must not leave one there
forever, and a sweep must never remove one that a live process is still filling.

Each temporary directory holds an owner file (:data:`OWNER_FILE`: pid, host, start time, purpose)
on which its process holds an exclusive ``flock`` for as long as it works. The kernel drops the
lock when the process dies, however it dies, so "the lock can be taken" means "the owner is gone",
without trusting pids (which get reused). Directories from natix versions that wrote no owner file
count as stale once nothing in them has changed for :data:`LEGACY_STALE_S` seconds.

:func:`sweep_stale` runs before natix creates a temporary directory in the same place and logs (on
the ``natix`` logger, which the CLIs print) what it removed. A stale parked old output whose
destination is missing (a ``--force`` killed between its two renames) is put back, not removed.
On SIGTERM the CLIs call :func:`remove_owned`, which does the same for this process's own
directories before it exits.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OWNER_FILE = ".natix-owner"
LEGACY_STALE_S = 3600

log = logging.getLogger("natix")


@dataclass
class OwnedDir:
    """A temporary directory and the open, locked owner file that keeps it ours."""

    path: Path
    restore_to: str | None
    _fd: int | None

    def release(self) -> None:
        """Remove the owner file and drop the lock (before renaming the directory into place).
        The directory stays on this process's list for :func:`remove_owned` until :meth:`done`."""
        if self._fd is None:
            return
        try:
            (self.path / OWNER_FILE).unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def done(self) -> None:
        """The directory is gone (renamed into place or removed): forget it."""
        self.release()
        _LIVE.pop(self.path, None)


#: this process's temporary directories, oldest first, for :func:`remove_owned`
_LIVE: dict[Path, OwnedDir] = {}


def make_owned_dir(parent: Path, prefix: str, *, restore_to: str | None = None, **record: Any) -> OwnedDir:
    """``mkdtemp(prefix=prefix, dir=parent)`` plus a locked owner file holding ``record``;
    ``restore_to``: the name the directory's ``old`` entry goes back to if its owner dies."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    owned = _LIVE[path] = OwnedDir(path, restore_to, None)
    try:
        owned._fd = os.open(path / OWNER_FILE, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        fcntl.flock(owned._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(owned._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "restore_to": restore_to,
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}).encode())
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        owned.done()
        raise
    return owned


def _restore(path: Path, restore_to: Any) -> str | None:
    """Put a parked old output (``path/old``) back at ``restore_to`` if nothing took its place."""
    target = path.parent / restore_to if isinstance(restore_to, str) else None
    if target is not None and (path / "old").exists() and not os.path.lexists(target):
        os.rename(path / "old", target)
        return f"restored {target} from {path.name}, parked there by an interrupted --force run"
    return None


def remove_owned() -> None:
    """Remove every temporary directory this process still has, newest first, putting parked old
    outputs back first: what a SIGTERM handler does before the process exits
    (:func:`natix.quant.cli_base.terminate_on_signals`)."""
    for owned in reversed(list(_LIVE.values())):
        try:
            _restore(owned.path, owned.restore_to)
        except OSError:
            pass
        shutil.rmtree(owned.path, ignore_errors=True)
        _LIVE.pop(owned.path, None)


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for f in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, f)).st_mtime)
            except OSError:
                pass
    return newest


def _owner_gone(path: Path) -> tuple[bool, dict[str, Any]]:
    """Whether ``path``'s owner is gone (and its record). Takes the lock to find out, then lets go."""
    owner = path / OWNER_FILE
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:  # a natix before owner files, or an owner between release and rename
        return time.time() - _newest_mtime(path) > LEGACY_STALE_S, {}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False, {}
        try:
            record = json.loads(os.read(fd, 1 << 16) or b"{}")
        except ValueError:
            record = {}
        return True, record if isinstance(record, dict) else {}
    finally:
        os.close(fd)


def sweep_stale(parent: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove the temporary directories in ``parent`` named ``prefix*`` whose owner is gone;
    return (and log) one message per directory removed or restored."""
    messages: list[str] = []
    try:
        entries = sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p.is_dir()
                         and not p.is_symlink())
    except OSError:  # no parent yet, or unreadable: nothing of ours to sweep
        return messages
    for path in entries:
        try:
            gone, record = _owner_gone(path)
        except OSError:
            continue
        if not gone:
            continue
        who = f"pid {record['pid']}, no longer running" if "pid" in record else "no owner record, unchanged for over an hour"
        restored = _restore(path, record.get("restore_to"))
        if restored:
            messages.append(f"{restored} ({who})")
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        messages.append(f"removed stale temporary directory {path} ({size / 1e6:.1f} MB) left by an interrupted "
                        f"run ({who})")
    for m in messages:
        log.warning(m)
    return messages
