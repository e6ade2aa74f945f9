"""A benchmark killed mid-run (SIGTERM, then kill -9) resumes cleanly: finished cells are kept and
not redone, no cell is written twice, and nothing is left behind. Real processes and signals on
the tiny model through the hf engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = "import sys; from natix.bench.cli import main; sys.argv[0] = 'natix-bench'; main()"


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {what}: {proc.communicate()[1]}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.02)


def test_killed_bench_resumes_without_duplicates_or_debris(bench_model, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cells = out / "cells.jsonl"
    args = ["run", "--model", str(bench_model), "--variant", "base", "--strategy", "greedy", "--strategy", "maj@4",
            "--items", "4", "--max-tokens", "48", "--out", str(out), "--no-progress"]
    # SIGTERM once the greedy draw is written: that cell stays, the process exits 143
    proc = _start(args)
    _wait(lambda: cells.is_file() and cells.read_text().count("\n") >= 1, proc, "a first cell")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, err
    assert [json.loads(x)["strategy"] for x in cells.read_text().splitlines()] == ["greedy"]
    # kill -9 while the resumed run works on the sampled draw
    mtime = (out / "matrix.json").stat().st_mtime_ns
    proc = _start(args)
    _wait(lambda: (out / "matrix.json").stat().st_mtime_ns != mtime, proc, "the resumed run to start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # the next run finishes what is missing and only that
    done = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "/greedy: accuracy" not in done.stderr and "/maj@4: accuracy" in done.stderr, done.stderr
    rows = [json.loads(x) for x in cells.read_text().splitlines()]
    assert sorted(r["strategy"] for r in rows) == ["greedy", "maj@4"]
    assert sorted(os.listdir(out)) == ["cells.jsonl", "matrix.json", "report.html", "report.md"]
    assert (out / "report.md").read_text().count("| maj@4 |") == 1
