"""The benchmark harness end to end on a scripted engine: cells, metrics, resume, report, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import pytest
from click.testing import CliRunner

from natix.bench.matrix import Matrix, Variant
from natix.bench.report import render, vs_greedy
from natix.bench.runner import load_cells, run_matrix as _run_matrix
from natix.bench.tasks import chain_terms, get_task, worked_solution
from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine


def _wrong(expr: str) -> str:
    terms = chain_terms(expr)
    return f"{terms[0]} + 1 = {terms[0] + 2}. The answer is {sum(terms) + 1}."


@register_engine("scripted-test")
class ScriptedEngine:
    """Greedy is right on even-length problems; each sample is right with probability 0.4 and
    otherwise arithmetically wrong, so a verifier can tell them apart. Counts its calls."""

    calls: list[tuple[int, int]] = []

    def load(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.task = get_task("chain_sum")

    def info(self) -> dict:
        return {"engine": "scripted-test", "device": "cpu"}

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        ScriptedEngine.calls.append((len(prompts), spec.n))
        out = []
        for p in prompts:
            expr = p.split(": ", 1)[1].split(" =")[0]
            rng = random.Random(f"{expr}/{spec.seed}/{spec.temperature}/{self.cfg.adapter}")
            comps = []
            for _ in range(spec.n):
                good = (len(expr) % 2 == 0) if spec.greedy else rng.random() < 0.4
                text = worked_solution(expr) if good else _wrong(expr)
                ids = tuple(range(len(text.split())))
                comps.append(Completion(text, ids, tuple(-0.1 for _ in ids), "stop",
                                        Timing(0.01, 0.001, 0.02)))
            out.append(comps)
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def fake_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    class Plain:  # no chat template: apply_chat returns the user text; a token per word
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": text.split()})()

    monkeypatch.setattr("natix.quant.models.load_tokenizer", lambda spec: Plain())


def run_matrix(*args, **kw):
    """In this process (the scripted engine is registered only here)."""
    return _run_matrix(*args, isolate=False, **kw)


def _matrix(**kw) -> Matrix:
    base = dict(items=12, engines=("scripted-test",), variants=(Variant("base"), Variant("tuned", "demo")),
                strategies=("greedy", "maj@8", "bo8:verifier", "bo8:logprob", "adaptive@16"))
    base.update(kw)
    return Matrix(**base)


def test_run_writes_every_cell_with_metrics(tmp_path: Path, fake_tokenizer: None) -> None:
    ScriptedEngine.calls.clear()
    rows = run_matrix(_matrix(), tmp_path, progress=False, log=lambda s: None)
    assert len(rows) == 2 * 5
    # one greedy draw and one shared n=16 draw per variant
    assert {n for _, n in ScriptedEngine.calls} == {1, 16}
    assert sum(k for k, n in ScriptedEngine.calls if n == 16) == 2 * 12  # each item drawn once
    by = {r["key"]: r for r in rows}
    bo = by["base/none/scripted-test/kv=auto/b=64/T=0.7/bo8:verifier"]
    maj = by["base/none/scripted-test/kv=auto/b=64/T=0.7/maj@8"]
    # the verifier recognises the right worked solution whenever one of 8 samples has it
    assert bo["accuracy"] == pytest.approx(bo["coverage"], abs=0.2) and bo["accuracy"] >= maj["accuracy"]
    for r in rows:
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert len(r["per_item"]["correct"]) == 12
        assert r["env"]["torch"] and "git_sha" in r["env"]
    ada = by["base/none/scripted-test/kv=auto/b=64/T=0.7/adaptive@16:lead,round=2,min=1"]
    assert ada["samples_spent_mean"] <= 16 and ada["samples_saved_mean"] == pytest.approx(16 - ada["samples_spent_mean"])


def test_rerun_resumes_and_settings_change_reruns(tmp_path: Path, fake_tokenizer: None) -> None:
    m = _matrix(strategies=("greedy", "maj@4"))
    run_matrix(m, tmp_path, progress=False, log=lambda s: None)
    ScriptedEngine.calls.clear()
    rows = run_matrix(m, tmp_path, progress=False, log=lambda s: None)
    assert ScriptedEngine.calls == [] and len(rows) == 4
    # A new strategy runs only its own draw group; other cells stay.
    run_matrix(_matrix(strategies=("greedy", "maj@4"), temperatures=(0.7, 1.0)), tmp_path,
               progress=False, log=lambda s: None)
    assert {n for _, n in ScriptedEngine.calls} == {4}
    # Different settings (seed) do not count as done.
    ScriptedEngine.calls.clear()
    run_matrix(_matrix(strategies=("greedy",), seed=1), tmp_path, progress=False, log=lambda s: None)
    assert ScriptedEngine.calls


def test_torn_last_line_is_ignored(tmp_path: Path, fake_tokenizer: None) -> None:
    run_matrix(_matrix(strategies=("greedy",)), tmp_path, progress=False, log=lambda s: None)
    with open(tmp_path / "cells.jsonl", "a") as fh:
        fh.write('{"key": "trunc')
    assert len(load_cells(tmp_path)) == 2
    # the next run cuts the torn line before appending, so the file stays readable
    run_matrix(_matrix(strategies=("greedy", "maj@2")), tmp_path, progress=False, log=lambda s: None)
    assert len(load_cells(tmp_path)) == 4


def test_report_paired_difference_and_verdict(tmp_path: Path, fake_tokenizer: None) -> None:
    rows = run_matrix(_matrix(items=30), tmp_path, progress=False, log=lambda s: None)
    diffs = vs_greedy(rows)
    text = render(rows)
    for r in rows:
        assert r["strategy"] in text
        if r["strategy"] != "greedy":
            mean, lo, hi = diffs[r["key"]]
            assert lo <= mean <= hi
    assert "Most correct answers per second here" in text and "Wilson" in text


def test_matrix_yaml_and_flags(tmp_path: Path) -> None:
    y = tmp_path / "m.yaml"
    y.write_text("name: small\nitems: 5\nvariants: [base, {name: mine, adapter: /x}]\ntemperature: [0.3, 0.7]\n")
    m = Matrix.from_yaml(y)
    assert m.items == 5 and m.temperatures == (0.3, 0.7) and m.variants[1] == Variant("mine", "/x")
    m2 = Matrix.from_mapping({"items": 9, "strategies": ["greedy"]}, m)
    assert m2.items == 9 and m2.name == "small" and m2.strategies == ("greedy",)


@pytest.mark.parametrize("content,needle", [
    ("items: 0\n", "items must be >= 1"),
    ("colour: red\n", "unknown matrix keys"),
    ("task: nope\n", "unknown task"),
    ("strategies: [maj@x]\n", "maj@x"),
    ("temperature: 0\n", "must be > 0"),
    ("[1, 2]\n", "must hold a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_matrix_is_a_clear_error(tmp_path: Path, content: str, needle: str) -> None:
    from natix.bench.cli import main

    y = tmp_path / "m.yaml"
    y.write_text(content)
    res = CliRunner().invoke(main, ["run", "--matrix", str(y), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and needle in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_cli_missing_matrix_file(tmp_path: Path) -> None:
    from natix.bench.cli import main

    res = CliRunner().invoke(main, ["run", "--matrix", str(tmp_path / "absent.yaml")])
    assert res.exit_code != 0 and "cannot read matrix file" in res.output


def test_cli_report_rerenders(tmp_path: Path, fake_tokenizer: None) -> None:
    from natix.bench.cli import main

    run_matrix(_matrix(strategies=("greedy", "maj@4")), tmp_path, progress=False, log=lambda s: None)
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "maj@4" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "matrix.json").read_text())["matrix"]["items"] == 12


def test_cli_bad_adapter_fails_before_loading(tmp_path: Path) -> None:
    from natix.bench.cli import main

    res = CliRunner().invoke(main, ["run", "--items", "2", "--variant", f"mine={tmp_path / 'absent'}",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "does not exist" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_resume_with_a_changed_strategy_list_never_duplicates(tmp_path: Path, fake_tokenizer: None) -> None:
    """Adding maj@4 to a run that has maj@2 redraws that group and replaces its rows: maj@2 was
    in cells.jsonl (and the report) twice."""
    run_matrix(_matrix(strategies=("greedy", "maj@2")), tmp_path, progress=False, log=lambda s: None)
    rows = run_matrix(_matrix(strategies=("greedy", "maj@2", "maj@4")), tmp_path, progress=False, log=lambda s: None)
    keys = [json.loads(x)["key"] for x in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6 and len(rows) == 6
    assert render(rows).count("| maj@2 |") == 2  # once per variant
    # the redrawn group's strategies share one draw again
    by = {r["key"]: r for r in rows}
    assert by["base/none/scripted-test/kv=auto/b=64/T=0.7/maj@2"]["draw"] == by["base/none/scripted-test/kv=auto/b=64/T=0.7/maj@4"]["draw"]


def test_fresh_keeps_old_cells_until_new_ones_are_written(tmp_path: Path, fake_tokenizer: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run_matrix(_matrix(strategies=("greedy",)), tmp_path, progress=False, log=lambda s: None)
    before = (tmp_path / "cells.jsonl").read_text()

    def broken(self, prompts, spec):
        raise RuntimeError("engine died")

    monkeypatch.setattr(ScriptedEngine, "generate", broken)
    rows = run_matrix(_matrix(strategies=("greedy",), seed=3), tmp_path, progress=False, log=lambda s: None, fresh=True)
    # the failure is recorded per cell and the run went on; the old cells are still there
    assert [r["status"] for r in rows] == ["error", "error"] and "engine died" in rows[0]["error"]
    assert (tmp_path / "cells.jsonl").read_text().startswith(before)
    monkeypatch.undo()
    run_matrix(_matrix(strategies=("greedy",), seed=3), tmp_path, progress=False, log=lambda s: None, fresh=True)
    rows = load_cells(tmp_path)
    assert len(rows) == 2 and {r["settings"]["seed"] for r in rows} == {3}


def test_max_tokens_is_what_runs(tmp_path: Path, fake_tokenizer: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = ScriptedEngine.generate

    def spy(self, prompts, spec):
        seen.append(spec.max_tokens)
        return original(self, prompts, spec)

    monkeypatch.setattr(ScriptedEngine, "generate", spy)
    rows = run_matrix(_matrix(strategies=("greedy",), max_tokens=(7,)), tmp_path, progress=False, log=lambda s: None)
    assert set(seen) == {7} and rows[0]["max_tokens"] == 7
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        _matrix(max_tokens=(0,))


def test_yaml_single_values_are_lists_of_one(tmp_path: Path) -> None:
    y = tmp_path / "m.yaml"
    y.write_text("variants: base\nstrategies: greedy\ntemperatures: 0.5\n")
    m = Matrix.from_yaml(y)
    assert m.variants == (Variant("base"),) and m.strategies == ("greedy",) and m.temperatures == (0.5,)


def test_cli_report_renders_the_matrix_settings_only(tmp_path: Path, fake_tokenizer: None) -> None:
    from natix.bench.cli import main

    run_matrix(_matrix(strategies=("greedy",), seed=1), tmp_path, progress=False, log=lambda s: None)
    run_matrix(_matrix(strategies=("greedy",)), tmp_path, progress=False, log=lambda s: None)
    assert len(load_cells(tmp_path)) == 4
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.md").read_text().count("| greedy | 0 |") == 2
