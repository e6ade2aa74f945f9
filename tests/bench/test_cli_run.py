"""README's commands as a new user runs them: the bundled CI matrix from one YAML on both CPU
engines (2 items, 2 schemes, 2 strategies), a default run that lands in a fresh runs/ directory and
never in a committed report, progress per sample with plain lines off a terminal, --version and
--help with examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from natix.bench.cli import main

CLI = "import sys; from natix.bench.cli import main; sys.argv[0] = 'natix-bench'; main()"


def test_ci_matrix_from_one_yaml_on_both_engines(bench_model: Path, tmp_path: Path) -> None:
    env = dict(os.environ, NATIX_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", CLI, "run", "--matrix", "ci", "--model", str(bench_model),
                          "--out", str(tmp_path / "ci")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "ci" / "cells.jsonl").read_text().splitlines()]
    assert {(r["scheme"], r["engine"], r["strategy"]) for r in rows} == {
        (s, e, t) for s in ("none", "fp8") for e in ("hf", "natix") for t in ("greedy", "maj@2")}
    assert all(r["status"] == "ok" and r["n_items"] == 2 for r in rows)
    for r in rows:  # the metrics every cell carries
        assert r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0 and r["ttft_s"]["p50"] > 0
        assert r["draw"]["tokens_per_s"] > 0 and r["draw"]["requests_per_s"] > 0 and "cost" in r
        assert (r["itl_s"] is not None) == (r["engine"] == "natix")  # natix streams tokens
    assert list((tmp_path / "cache-artifacts").glob("fp8-*"))  # exported once, by content hash
    md = (tmp_path / "ci" / "report.md").read_text()
    assert "| fp8 | natix |" in md and (tmp_path / "ci" / "report.html").stat().st_size > 10_000
    # progress: plain lines (stderr is a pipe), per sample, with the run's ETA
    assert "samples" in res.stderr and "run ETA" in res.stderr, res.stderr
    # a rerun of the same --out has nothing to do
    again = subprocess.run([sys.executable, "-c", CLI, "run", "--matrix", "ci", "--model", str(bench_model),
                            "--out", str(tmp_path / "ci")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "nothing to run" in again.stderr


def test_default_output_is_a_fresh_run_directory(bench_model: Path, tmp_path: Path, monkeypatch) -> None:
    """No --out: runs/<name>-<time>/, a new one each time, never reports/ (a committed report
    there can neither be overwritten nor make the run skip)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports" / "bench-default").mkdir(parents=True)
    args = ["run", "--model", str(bench_model), "--variant", "base", "--items", "1", "--strategy", "greedy",
            "--max-tokens", "4", "--no-progress"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("smoke-") for r in runs), runs
    assert not any((tmp_path / "reports").rglob("*.jsonl"))
    matrix = json.loads((tmp_path / "runs" / runs[0] / "matrix.json").read_text())
    assert matrix["command"] is None or matrix["command"].startswith("natix-bench run")


def test_version_and_help_examples() -> None:
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("natix-bench, version ")
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0
    for needle in ("Examples:", "natix-bench run --full", "adaptive@N[:lead|beta", "boN:verifier", "--task-file"):
        assert needle in res.output, needle


def test_hf_engine_reports_each_finished_sample(bench_model: Path) -> None:
    from natix.engines.base import EngineConfig, SamplingSpec
    from natix.engines.hf_engine import HFEngine

    e = HFEngine()
    e.load(EngineConfig(model=str(bench_model), device="cpu", max_batch_size=4))
    seen: list[int] = []
    e.progress = seen.append
    e.generate(["ab", "cde", "f"], SamplingSpec(n=3, temperature=1.0, max_tokens=6, seed=1))
    assert sum(seen) == 9 and len(seen) >= 3  # batches of 4 rows: at least one call per batch
