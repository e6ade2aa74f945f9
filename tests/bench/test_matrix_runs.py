"""The matrix end to end through worker processes: plugins, exclusions, a crashed and a timed-out
group recorded while the run goes on, shards that cover every group once, a user's task file
(and the errors that name its lines), the yes/no task's calibration, and compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from natix.bench.cli import main
from natix.bench.matrix import Matrix, Scheme, Variant
from natix.bench.plan import plan
from natix.bench.runner import load_cells, run_matrix

PLUGIN = str(Path(__file__).resolve().parent / "plugins" / "engines_plugin.py")


def _task_file(tmp_path: Path, lines: list, options: dict | None = None) -> Path:
    p = tmp_path / "items.jsonl"
    rows = ([json.dumps({"task": options})] if options else []) + [x if isinstance(x, str) else json.dumps(x)
                                                                   for x in lines]
    p.write_text("\n".join(rows) + "\n")
    return p


def _yesno(tmp_path: Path) -> Path:
    items = [{"question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in range(6)]
    return _task_file(tmp_path, items, {"extractor": "yesno", "system": "Answer yes or no.", "name": "parity"})


def test_task_file_runs_in_workers_with_calibration(tmp_path: Path, bench_model: Path) -> None:
    """A yes/no task file on an engine that always says yes: accuracy is the share of yes items,
    P(yes) is 1 for every item, so Brier = share of no items and ECE = |accuracy - 1|."""
    m = Matrix(task_file=str(_yesno(tmp_path)), items=6, model=str(bench_model), variants=(Variant("base"),),
               engines=("constant-test",), strategies=("greedy", "maj@3"), plugins=(PLUGIN,))
    rows = run_matrix(m, tmp_path / "run", progress=False, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["task"] == "parity" and r["accuracy"] == pytest.approx(0.5)
        assert r["calibration"]["brier"] == pytest.approx(0.5) and r["calibration"]["ece"] == pytest.approx(0.5)
        assert r["per_item"]["p_yes"] == [1.0] * 6 and r["engine_info"]["kv_capacity_tokens"] == 1234
        assert r["cost"]["tokens_per_correct"] == pytest.approx(r["tokens_spent_mean"] * 6 / 3)
    report = (tmp_path / "run" / "report.md")
    assert not report.exists()  # run_matrix writes cells; the CLI writes reports


def test_crash_and_timeout_are_recorded_and_the_run_goes_on(tmp_path: Path, bench_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = dict(task_file=str(_yesno(tmp_path)), items=2, model=str(bench_model), variants=(Variant("base"),),
                strategies=("greedy",), plugins=(PLUGIN,), batch_sizes=(4, 8))
    # batch 4 crashes at load (os._exit in the worker), batch 8 runs
    m = Matrix(engines=("constant-test",), engine_options={"constant-test": {}}, **base)
    crash = Matrix(engines=("constant-test",), engine_options={"constant-test": {"crash_on_load": True}}, **base)
    rows = run_matrix(crash, tmp_path / "crash", progress=False, log=lambda s: None)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error_type"] == "WorkerDied" and "status 7" in rows[0]["error"]
    # the next run retries failed cells (now fine)
    rows = run_matrix(m, tmp_path / "crash", progress=False, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    monkeypatch.setenv("NATIX_TEST_SLEEP", "30")
    slow = Matrix(engines=("constant-test",), cell_timeout_s=8.0, **{**base, "batch_sizes": (4,)})
    rows = run_matrix(slow, tmp_path / "slow", progress=False, log=lambda s: None)
    assert rows[0]["status"] == "error" and rows[0]["error_type"] == "Timeout"


def test_exclusions_are_stated_and_shards_cover_every_group(tmp_path: Path) -> None:
    m = Matrix(schemes=(Scheme("none", "none"), Scheme("gptq", "gptq")), engines=("hf", "natix"),
               kv=("auto", "int4", "knorm:0.5"), strategies=("greedy",))
    p = plan(m)
    assert "the natix engine does not load gptq" in p.excluded_groups["adapter/gptq/natix/kv=auto/b=64"]
    assert "quantizes the KV cache only as an artifact declares" in p.excluded_groups["adapter/none/hf/kv=int4/b=64"]
    assert "scheme gptq has no int4" in p.excluded_groups["adapter/gptq/hf/kv=int4/b=64"]
    assert "natix has no presses" in p.excluded_groups["adapter/none/natix/kv=knorm:0.5/b=64"]
    assert {g.key for g in p.groups} == {"adapter/none/hf/kv=auto/b=64", "adapter/none/natix/kv=auto/b=64",
                                         "adapter/gptq/hf/kv=auto/b=64", "adapter/none/natix/kv=int4/b=64",
                                         "adapter/none/hf/kv=knorm:0.5/b=64", "adapter/gptq/hf/kv=knorm:0.5/b=64"}
    # a cell, not a group: natix runs a request's n samples in one batch
    small = plan(Matrix(engines=("hf", "natix"), strategies=("greedy", "maj@8"), batch_sizes=(4,)))
    assert small.excluded == {"adapter/none/natix/kv=auto/b=4/T=0.7/maj@8":
                              "the natix engine runs a request's 8 samples in one batch: batch size 4 is smaller"}
    assert len(small.groups) == 2
    shards = [plan(m, shard=(i, 3)).groups for i in (1, 2, 3)]
    assert sorted(g.key for s in shards for g in s) == sorted(g.key for g in p.groups)
    assert all(len(s) == 2 for s in shards)


def test_task_file_errors_name_the_line(tmp_path: Path) -> None:
    cases = [
        (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": '], "items.jsonl:2 is not valid JSON"),
        ([{"question": "a"}], "items.jsonl:1: 'answer' is missing"),
        ([{"question": "a", "answer": "1"}, {"question": "", "answer": "2"}], "items.jsonl:2: 'question' must be"),
        ([{"question": "a", "answer": "maybe"}], "the answer 'maybe' is not something the yesno extractor reads"),
        ([{"question": "a", "answer": "1", "id": "x"}, {"question": "b", "answer": "2", "id": "x"}],
         "id 'x' was already used on line 1"),
        ([["not", "an", "object"]], "items.jsonl:1 must be a JSON object"),
        ([{"question": "a", "answer": "1", "colour": "red"}], "unknown keys ['colour']"),
    ]
    for lines, needle in cases:
        opts = {"extractor": "yesno"} if "maybe" in needle else None
        f = _task_file(tmp_path, lines, opts)
        res = CliRunner().invoke(main, ["run", "--task-file", str(f), "--out", str(tmp_path / "o")])
        assert res.exit_code == 1 and needle in res.output, (needle, res.output)
        assert len([x for x in res.output.splitlines() if x.strip()]) == 1
        assert not (tmp_path / "o").exists()
    f = _task_file(tmp_path, [{"question": "a", "answer": "1"}], {"verifier": "nope.py:score"})
    res = CliRunner().invoke(main, ["run", "--task-file", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope.py is not a file" in res.output, res.output


def test_task_file_prompt_few_shot_and_verifier(tmp_path: Path) -> None:
    from natix.bench.task_file import load_task_file

    (tmp_path / "checks.py").write_text("def score(question, text):\n    return float('42' in text)\n")
    f = _task_file(tmp_path, [{"question": "6 x 7?", "answer": "42", "system": "Be brief."}],
                   {"few_shot": [{"question": "2 x 2?", "answer": "4"}], "verifier": "checks.py:score",
                    "system": "You multiply."})
    task = load_task_file(f)
    (item,) = task.items("eval", 10)

    class Plain:
        chat_template = None

    assert task.prompt(Plain(), item) == "Be brief.\n\n2 x 2?\n4\n\n6 x 7?"
    assert task.has_verifier and task.verify(item, "it is 42") == 1.0 and task.verify(item, "41") == 0.0
    assert task.is_correct(task.extract("The answer is 42."), item)


def test_syllogism_is_a_yes_no_task() -> None:
    from natix.bench.tasks import get_task, split_of

    task = get_task("syllogism")
    items = task.items("eval", 30)
    labels = [task.gold_label(it) for it in items]
    assert set(labels) == {"yes", "no"} and len({it.question for it in items}) == 30
    assert all(split_of(it.question) == "eval" for it in items)
    assert task.extractor == "yesno" and not task.has_verifier
    assert task.is_correct(task.extract("No, because ..."), items[labels.index("no")])


def test_compare_prints_paired_differences(tmp_path: Path, bench_model: Path) -> None:
    f = _yesno(tmp_path)
    common = dict(task_file=str(f), items=6, model=str(bench_model), variants=(Variant("base"),),
                  engines=("constant-test",), strategies=("greedy",), plugins=(PLUGIN,))
    run_matrix(Matrix(**common), tmp_path / "a", progress=False, log=lambda s: None, isolate=False)
    run_matrix(Matrix(engine_options={"constant-test": {"text": "No."}}, **common), tmp_path / "b",
               progress=False, log=lambda s: None, isolate=False)
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("base/"))
    assert "50.0%" in line and "+0.0" in line  # always-yes and always-no are both right on half the items
    assert len(load_cells(tmp_path / "a")) == 1


def test_few_shot_axis_lengthens_prompts(tmp_path: Path, bench_model: Path) -> None:
    m = Matrix(items=2, model=str(bench_model), variants=(Variant("base"),), engines=("constant-test",),
               strategies=("greedy",), few_shot=(0, 2), plugins=(PLUGIN,))
    rows = run_matrix(m, tmp_path / "run", progress=False, log=lambda s: None, isolate=False)
    by = {r["few_shot"]: r for r in rows}
    assert set(by) == {0, 2} and by[2]["key"].endswith("/shots=2/T=0/greedy")
    assert by[2]["prompt_tokens_mean"] > by[0]["prompt_tokens_mean"] + 40  # two worked examples, char tokens
    with pytest.raises(ValueError, match="has no training split"):
        Matrix(task_file=str(_yesno(tmp_path)), few_shot=(1,))
