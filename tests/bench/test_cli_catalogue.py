"""The bad-input catalogue for ``natix-bench``: ``run`` and ``report`` with bad flags, bad YAML and
faulty directories. Each case: exit status 1 (2 for usage), one line on stderr naming the problem,
no traceback or "internal error", and nothing under the inputs' tree written or changed (a
previous run's ``cells.jsonl`` and ``matrix.json`` included: ``--fresh`` and a failed run used to
delete or overwrite them before checking anything)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from natix.bench.cli import main
from natix.bench.matrix import Matrix, Variant

BAD_UTF8 = "out-\udcff"  # how Python hands click a shell argument holding the byte 0xff (tests/conftest.py)

YAML = {
    "items-text": "items: two\n",
    "temperature-nan": "temperatures: [.nan]\n",
    "variants-int": "variants: 3\n",
    "strategies-int": "strategies: [1]\n",
    "top-p": "top_p: 2\n",
    "max-tokens-zero": "max_tokens: 0\n",
    "device": "device: foo\n",
    "variant-extra-key": "variants: [{name: x, adaptor: /a}]\n",
    "engine-python": "engine_python: [a]\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, bench_model, cli_checks):
    root = tmp_path_factory.mktemp("bench-world")
    shutil.copytree(bench_model, root / "model")
    shutil.copytree(Path(__file__).resolve().parents[2] / "bench" / "data" / "adapters" / "smollm2-chain-sum-lora",
                    root / "adapter")
    for name, text in YAML.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    # a previous run's directory: matrix.json + cells (a torn middle line in a copy)
    prev = root / "prev"
    prev.mkdir()
    (prev / "matrix.json").write_text(json.dumps(Matrix(model=str(root / "model"), variants=(Variant("base"),),
                                                        strategies=("greedy",)).to_dict()))
    row = {"key": "base/hf/kv=none/T=0/greedy", "settings": {}, "variant": "base", "engine": "hf", "kv_press": "none",
           "temperature": 0.0, "strategy": "greedy", "task": "chain_sum", "n_items": 1, "accuracy": 1.0,
           "ci95": [0, 1], "coverage": 1.0, "coverage_k": 1, "budget": 1, "samples_spent_mean": 1,
           "tokens_spent_mean": 1, "latency_s": {"p50": 0, "p90": 0}, "ttft_s_p50": 0, "decode_ms_per_token_p50": 0,
           "draw": {"tokens_per_s": 1}, "per_item": {"ids": [0], "correct": [1], "answers": ["1"]}}
    (prev / "cells.jsonl").write_text(json.dumps(row) + "\n")
    torn = root / "torn"
    shutil.copytree(prev, torn)
    (torn / "cells.jsonl").write_text(json.dumps(row) + "\n" + '{"key": "tor\n' + json.dumps(row) + "\n")
    (root / "notrows").mkdir()
    (root / "notrows" / "cells.jsonl").write_text("[1, 2]\n")
    (root / "mydocs").mkdir()
    (root / "mydocs" / "matrix.json").write_text("my own notes, not a natix matrix\n")
    (root / "mydocs" / "report.md").write_text("# my report\n")
    ro_ok = cli_checks.make_unwritable(root / "ro")
    yield root, ro_ok
    cli_checks.release_unwritable(root / "ro")


RUN = ["run", "--model", "{w}/model", "--variant", "base", "--items", "2", "--no-progress"]
CASES = [
    ("device", RUN + ["--device", "foo", "--out", "{w}/o"], 2, "'foo' is not a device"),
    ("temperature-nan", RUN + ["--temperature", "nan", "--out", "{w}/o"], 2, "not a finite number"),
    ("max-tokens-zero", RUN + ["--max-tokens", "0", "--out", "{w}/o"], 2, "0 is not in the range"),
    ("items-zero", RUN + ["--items", "0", "--out", "{w}/o"], 2, "0 is not in the range"),
    *[(f"yaml-{n}", ["run", "--matrix", f"{{w}}/{n}.yaml", "--out", "{w}/o"], 1, need) for n, need in (
        ("items-text", "items must be an integer, got 'two'"), ("temperature-nan", "finite number"),
        ("variants-int", "a variant is a name or a mapping"), ("strategies-int", "strategies must be a non-empty"),
        ("top-p", "top_p must be in (0, 1]"), ("max-tokens-zero", "max_tokens must be >= 1"),
        ("device", "'foo' is not a device"), ("variant-extra-key", "a variant is a name or a mapping"),
        ("engine-python", "engine_python must map"))],
    ("yaml-not-utf8", ["run", "--matrix", "{w}/latin1.yaml", "--out", "{w}/o"], 1, "is not UTF-8 text"),
    ("yaml-is-dir", ["run", "--matrix", "{w}/model", "--out", "{w}/o"], 1, "Is a directory"),
    ("fresh-bad-variant", RUN + ["--variant", "mine={w}/nope", "--fresh", "--out", "{w}/prev"], 1, "does not exist"),
    ("bad-variant-keeps-matrix-json", RUN + ["--variant", "mine={w}/nope", "--out", "{w}/prev"], 1,
     "does not exist"),
    ("variant-empty-name", RUN + ["--variant", "={w}/adapter", "--out", "{w}/o"], 1, "variant name must be"),
    ("variant-duplicate", RUN + ["--variant", "base", "--out", "{w}/o"], 1, "lists base more than once"),
    ("strategy-duplicate", RUN + ["--strategy", "greedy", "--strategy", "greedy", "--out", "{w}/o"], 1,
     "lists greedy more than once"),
    ("strategy-bad", RUN + ["--strategy", "maj@x", "--out", "{w}/o"], 1, "maj@x"),
    ("engine", RUN + ["--engine", "nope", "--out", "{w}/o"], 1, "unknown engine 'nope'"),
    ("kv-press", RUN + ["--kv-press", "bogus:0.5", "--out", "{w}/o"], 1, "unknown kv press"),
    ("python", RUN + ["--python", "{w}/nope/python", "--out", "{w}/o"], 1, "is not an executable file"),
    ("name-path", RUN + ["--name", "../x", "--out", "{w}/o"], 1, "may not contain '/'"),
    ("missing-model", ["run", "--model", "{w}/nope", "--variant", "base", "--out", "{w}/o"], 1, "not found"),
    ("out-is-adapter", RUN + ["--variant", "mine={w}/adapter", "--out", "{w}/adapter"], 1, "is the adapter"),
    ("out-inside-model", RUN + ["--out", "{w}/model/bench"], 1, "inside the model directory"),
    ("out-user-dir", RUN + ["--out", "{w}/mydocs"], 1, "is not a natix-bench output directory"),
    ("out-matrix-is-input", ["run", "--matrix", "{w}/prev/matrix.json", "--model", "{w}/model", "--out", "{w}/prev"], 1,
     "is the matrix file"),
    ("out-torn-middle-line", RUN + ["--out", "{w}/torn"], 1, "cells.jsonl:2 is not valid JSON"),
    ("out-not-utf8", RUN + ["--out", "{w}/" + BAD_UTF8], 2, "not valid UTF-8"),
    ("out-read-only", RUN + ["--out", "{w}/ro/o"], 1, "is not writable"),
    ("report-torn-middle-line", ["report", "{w}/torn"], 1, "cells.jsonl:2 is not valid JSON"),
    ("report-not-rows", ["report", "{w}/notrows"], 1, "is not a natix-bench cell row"),
    ("report-no-cells", ["report", "{w}/model"], 1, "has no cells.jsonl rows"),
    ("report-missing", ["report", "{w}/nope"], 2, "does not exist"),
]


@pytest.mark.parametrize(("args", "code", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, cli_checks, monkeypatch, tmp_path, args, code, needle):
    root, ro_ok = world
    if "{w}/ro/" in " ".join(args) and not ro_ok:
        pytest.skip("cannot make a read-only directory here")
    monkeypatch.setenv("NATIX_CACHE", str(tmp_path / "cache"))
    before = cli_checks.snapshot(root)
    cli_checks.check_refused(cli_checks.run_case(main, args, root), code, needle)
    assert cli_checks.snapshot(root) == before


def test_no_cuda_device_is_a_clear_error(world, cli_checks):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, _ = world
    cli_checks.check_refused(cli_checks.run_case(main, RUN + ["--device", "cuda", "--out", "{w}/o"], root), 1,
                             "no CUDA device is available")
