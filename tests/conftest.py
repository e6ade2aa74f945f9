"""Helpers every CLI's bad-input tests share (the catalogues in tests/quant and tests/bench)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import types
from pathlib import Path

import pytest

BAD_UTF8 = "out-\udcff"  # how Python hands click a shell argument holding the byte 0xff


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: mode, mtime and (files) content hash, to prove nothing changed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


def make_unwritable(path: Path) -> bool:
    """Create ``path`` as a directory nothing can be created in, root included (``chattr +i``;
    chmod for other users); False where neither works."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def release_unwritable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    elif path.exists():
        path.chmod(0o755)


def run_case(cli, args: list[str], root: Path):
    """Invoke ``cli`` with ``args``, ``{w}`` replaced by ``root``."""
    from click.testing import CliRunner

    return CliRunner().invoke(cli, [a.replace("{w}", str(root)) for a in args])


#: a progress line off a terminal (`natix.bench.progress`: "[m:ss] phase ..."), not part of an error
PROGRESS_LINE = re.compile(r"^\[\d+:\d{2}(?::\d{2})?\] ")


def check_refused(res, code: int, needle: str) -> None:
    """Exit ``code``, one stderr line holding ``needle`` (besides progress lines), no traceback, no internal error."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip() and not PROGRESS_LINE.match(x)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def cli_checks():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    return types.SimpleNamespace(BAD_UTF8=BAD_UTF8, snapshot=snapshot, make_unwritable=make_unwritable,
                                 release_unwritable=release_unwritable, run_case=run_case,
                                 check_refused=check_refused, PROGRESS_LINE=PROGRESS_LINE)
