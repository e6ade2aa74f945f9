"""Run a benchmark matrix: load each engine once, draw, let every strategy decide, write JSONL.

Rows go to ``<out>/cells.jsonl``, one per cell, appended as soon as a draw group finishes, so a
rerun resumes: cells already present (same key, same matrix settings) are skipped. A draw group
that has to run again because a strategy was added to it is redrawn whole and its rows replace the
old ones (its strategies stay on one draw, and no cell is ever in the file twice). Each row carries
per-item correctness so reports can make *paired* comparisons against greedy, and the environment
(device, versions, git SHA).

Before anything is written, :func:`preflight` checks the output directory (not inside the model or
an adapter, writable, empty or a previous natix-bench run, its cells file readable), the adapters,
the model and the device; ``fresh`` then discards the old cells only when the first new draw is
written, so a run that fails early leaves them as they were.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from natix.bench.matrix import BenchError, Group, Matrix, cell_key
from natix.bench.stats import percentile, wilson_interval
from natix.quant.artifact import TMP_FILE_SUFFIX, write_text_atomic

CELLS_FILE = "cells.jsonl"
MATRIX_FILE = "matrix.json"
REPORT_FILE = "report.md"
#: what a run writes into its output directory (and may therefore overwrite there)
OUTPUT_FILES = (CELLS_FILE, MATRIX_FILE, REPORT_FILE)


_SETTINGS = ("task", "items", "model", "seed", "max_tokens", "top_p", "top_k", "dtype")


def settings_of(matrix: dict[str, Any]) -> dict[str, Any]:
    """What must match for a stored cell to count as already done (from ``Matrix.to_dict()``)."""
    return {k: matrix[k] for k in _SETTINGS}


def _settings_fingerprint(m: Matrix) -> dict[str, Any]:
    return settings_of(m.to_dict())


#: what a report reads from every row
_ROW_KEYS = ("key", "settings", "variant", "engine", "kv_press", "temperature", "strategy", "task", "n_items",
             "accuracy", "ci95", "coverage", "coverage_k", "budget", "samples_spent_mean", "tokens_spent_mean",
             "latency_s", "ttft_s_p50", "decode_ms_per_token_p50", "draw", "per_item")


def _row_id(row: dict[str, Any]) -> tuple[str, str]:
    return row["key"], json.dumps(row["settings"], sort_keys=True)


def load_cells(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/cells.jsonl``, one per (cell key, settings), the last written winning.
    A torn last line (a run killed mid-write) is ignored; any other bad line is a
    :class:`BenchError` naming it."""
    path = out / CELLS_FILE
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from e
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; everything before it is good.
            if n != len(lines):
                raise BenchError(f"{path}:{n} is not valid JSON (only a torn last line, from a run killed "
                                 "mid-write, is skipped); fix or remove that line") from None
            continue
        if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
            raise BenchError(f"{path}:{n} is not a natix-bench cell row (needs {', '.join(_ROW_KEYS)})")
        rows[_row_id(row)] = row
    return list(rows.values())


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended rows start on a fresh line."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _write_rows(path: Path, rows: list[dict[str, Any]], *, truncate: bool) -> None:
    """Add ``rows`` to the cells file: appended, unless they replace rows already there (same
    cell, same settings) or ``truncate`` (``fresh``) drops the old ones: then the file is rewritten."""
    new = "".join(json.dumps(r) + "\n" for r in rows)
    old = [] if truncate or not path.is_file() else [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    ids = {_row_id(r) for r in rows}
    kept = [x for x in old if _row_id(json.loads(x)) not in ids]
    if truncate or len(kept) != len(old):
        write_text_atomic(path, "".join(x + "\n" for x in kept) + new)
    else:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(new)


def _is_bench_dir(out: Path) -> bool:
    """Whether ``out`` holds a previous natix-bench run (its matrix.json, or cell rows)."""
    try:
        m = json.loads((out / MATRIX_FILE).read_text(encoding="utf-8"))
        if isinstance(m, dict) and {"name", "task", "variants", "strategies"} <= set(m):
            return True
    except (OSError, ValueError):
        pass
    try:
        return bool(load_cells(out))
    except BenchError:
        return False


def preflight(m: Matrix, out: Path, *, inputs: Sequence[tuple[str, str | Path | None]] = ()) -> None:
    """Everything that can be checked before a byte is written or a model loaded (see the module
    docstring); ``inputs``: other files the caller read (the matrix YAML), which no output file may be."""
    from natix.quant.adapters import read_adapter
    from natix.quant.models import resolve_base
    from natix.quant.validate import check_device, check_no_overlap, check_text, check_writable_dir

    out = Path(check_text(str(out), "--out"))
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} exists and is not a directory")
    model = Path(m.model)
    dirs = [("model", model if model.is_dir() else None)]
    dirs += [(f"adapter of variant {v.name!r}", v.adapter_path()) for v in m.variants]
    check_no_overlap(out, dirs, replaces=False)
    for name in OUTPUT_FILES:
        check_no_overlap(out / name, inputs, flag=f"--out's {name}")
    if out.is_dir() and any(out.iterdir()) and not _is_bench_dir(out):
        raise BenchError(f"--out {out} already holds files and is not a natix-bench output directory (no "
                         f"{MATRIX_FILE} of a previous run); give a new or empty directory")
    load_cells(out)  # a cells file we cannot resume from fails now, naming the line
    for v in m.variants:  # fail on a missing or broken adapter before any model loads
        if v.adapter_path():
            read_adapter(v.adapter_path())
    if not (model / "natix_manifest.json").is_file():
        resolve_base(m.model)
    for e in m.engines:
        python = m.python_for(e)
        if python is None:
            check_device(m.device)  # a worker's interpreter may see other devices than this one
        elif shutil.which(python) is None:  # a path, or a name on PATH
            raise BenchError(f"interpreter {python} for engine {e!r} is not an executable file")
    check_writable_dir(out, what="--out")  # last: its probe file touches the directory's mtime


@dataclass
class Draw:
    """One engine call's output for all items, with timing."""

    completions: list[list[Any]]  # [item][sample] Completion
    wall_s: float
    correct: list[int] = field(default_factory=list)  # [item] right samples, graded once per draw


def _generate(engine: Any, prompts: Sequence[str], spec: Any, chunk: int,
              advance: Callable[[int], None]) -> Draw:
    """Generate in chunks of prompts (bounded memory, and progress that moves)."""
    out: list[list[Any]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        out.extend(engine.generate(list(part), spec))
        advance(len(part))
    return Draw(out, time.perf_counter() - t0)


def _cell_metrics(task: Any, items: Sequence[Any], results: Sequence[Any], draw: Draw,
                  draw_n: int) -> dict[str, Any]:
    from natix.scaling import pass_at_k

    correct = [task.is_correct(r.answer, it) for r, it in zip(results, items)]
    k = max(1, results[0].budget)
    # Coverage: could any of the strategy's budget of samples have answered right? Estimated
    # without bias from all draw_n samples (Chen et al. 2021).
    cov = [pass_at_k(len(comps), c, min(k, len(comps))) for comps, c in zip(draw.completions, draw.correct)]
    spent = [r.samples_spent for r in results]
    # Tokens this strategy consumed: the samples it read, in order.
    tokens = [sum(x.num_tokens for x in comps[: r.samples_spent]) for r, comps in zip(results, draw.completions)]
    totals = [c[0].timing.total_s for c in draw.completions if c and c[0].timing]
    ttfts = [c[0].timing.ttft_s for c in draw.completions if c and c[0].timing]
    decode = [c[0].timing.decode_s_per_token for c in draw.completions if c and c[0].timing]
    all_tokens = sum(x.num_tokens for comps in draw.completions for x in comps)
    n = len(items)
    lo, hi = wilson_interval(sum(correct), n)
    return {
        "n_items": n,
        "accuracy": sum(correct) / n, "ci95": [lo, hi],
        "coverage": sum(cov) / n, "coverage_k": k,
        "samples_spent_mean": sum(spent) / n, "budget": k,
        "samples_saved_mean": k - sum(spent) / n,
        "tokens_spent_mean": sum(tokens) / n,
        "answered": sum(r.answer is not None for r in results) / n,
        "draw": {"n": draw_n, "wall_s": draw.wall_s, "tokens": all_tokens,
                 "tokens_per_s": all_tokens / draw.wall_s if draw.wall_s > 0 else None},
        "latency_s": {"p50": percentile(totals, 50), "p90": percentile(totals, 90)},
        "ttft_s_p50": percentile(ttfts, 50),
        "decode_ms_per_token_p50": 1e3 * percentile(decode, 50),
        "per_item": {"ids": [it.id for it in items], "correct": correct,
                     "answers": [r.answer for r in results]},
    }


def run_matrix(m: Matrix, out: Path, *, progress: bool = True, log: Callable[[str], None] = print,
               fresh: bool = False, inputs: Sequence[tuple[str, str | Path | None]] = ()) -> list[dict[str, Any]]:
    """Run every cell of ``m`` not already in ``out`` (every cell, with ``fresh``: the old ones
    are discarded once the first new draw is written); return all rows of this matrix.
    ``inputs``: files the caller read, which no output may overwrite (:func:`preflight`)."""
    from natix.bench.env import environment
    from natix.bench.tasks import get_task
    from natix.engines.base import EngineConfig, SamplingSpec
    from natix.engines.chat import apply_chat
    from natix.quant.models import load_tokenizer
    from natix.scaling import Greedy, decide_all, parse_strategy

    out = Path(out)
    preflight(m, out, inputs=inputs)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a run killed while replacing one of them left its temp file
        (out / f".{name}{TMP_FILE_SUFFIX}").unlink(missing_ok=True)
    write_text_atomic(out / MATRIX_FILE, json.dumps(m.to_dict(), indent=2))
    fp = _settings_fingerprint(m)
    _drop_torn_tail(out / CELLS_FILE)
    done = set() if fresh else {r["key"] for r in load_cells(out) if r.get("settings") == fp}

    task = get_task(m.task)
    items = task.items("eval", m.items, seed=m.seed)
    tok = load_tokenizer(m.model)
    prompts = [apply_chat(tok, task.user_text(it), system=task.system) for it in items]
    by_prompt = {p: it for p, it in zip(prompts, items)}

    def verifier(prompt: str, text: str) -> float:
        score = task.verify(by_prompt[prompt], text)
        if score is None:
            raise ValueError(f"task {task.name!r} has no verifier")
        return score

    strategies = [parse_strategy(s, extractor=task.kind, verifier=verifier if task.has_verifier else None)
                  for s in m.strategies]
    greedy = [s for s in strategies if isinstance(s, Greedy)]
    sampled = [s for s in strategies if s not in greedy]
    draw_n = max((s.budget for s in sampled), default=0)
    max_tokens = task.max_tokens if m.max_tokens is None else m.max_tokens
    base_spec = SamplingSpec(n=1, temperature=0.0, max_tokens=max_tokens, seed=m.seed,
                             top_p=m.top_p, top_k=m.top_k)

    todo: list[tuple[Group, float | None, list[Any]]] = []
    for g in m.groups():
        if greedy and any(cell_key(g, 0.0, s.spec()) not in done for s in greedy):
            todo.append((g, None, greedy))
        for t in m.temperatures:
            if sampled and any(cell_key(g, t, s.spec()) not in done for s in sampled):
                todo.append((g, t, sampled))
    if not todo:
        log(f"all cells of matrix {m.name!r} already in {out / CELLS_FILE}; nothing to run")
        return [r for r in load_cells(out) if r.get("settings") == fp]

    bar, task_id = _progress(progress, len(items) * len(todo))
    engine = current = None
    try:
        for g, temp, strats in todo:
            if current != g:
                if engine is not None:
                    engine.close()
                engine = _load_engine(m, g, EngineConfig(
                    model=m.model, adapter=g.variant.adapter_path(), device=m.device, dtype=m.dtype,
                    max_batch_size=m.max_batch_size, kv_press=None if g.kv_press == "none" else g.kv_press))
                current = g
            n = 1 if temp is None else draw_n
            spec = base_spec.replace(n=n, temperature=temp or 0.0)
            chunk = max(1, m.max_batch_size // n)
            if bar is not None:
                bar.update(task_id, description=f"{g.key} {'greedy' if temp is None else f'T={temp:g} n={n}'}")
            draw = _generate(engine, prompts, spec, chunk,
                             (lambda k: bar.advance(task_id, k)) if bar is not None else (lambda k: None))
            draw.correct = [sum(task.is_correct(task.extract(x.text), it) for x in comps)
                            for comps, it in zip(draw.completions, items)]
            decided = decide_all(strats, draw.completions, prompts)
            info = engine.info() if hasattr(engine, "info") else {}
            env = environment(info.get("device"))
            env.update(info.get("worker_versions") or {})  # the engine's venv, when it ran elsewhere
            rows = []
            for s in strats:
                key = cell_key(g, temp or 0.0, s.spec())
                rows.append({"key": key, "matrix": m.name, "settings": fp, "variant": g.variant.name,
                             "adapter": g.variant.adapter, "engine": g.engine, "kv_press": g.kv_press,
                             "temperature": temp or 0.0, "strategy": s.spec(), "task": m.task,
                             **_cell_metrics(task, items, decided[s.spec()], draw, n),
                             "engine_info": info, "env": env, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            _write_rows(out / CELLS_FILE, rows, truncate=fresh)
            fresh = False  # the old cells are gone now; later draws append
            for row in rows:
                log(f"{row['key']}: accuracy {row['accuracy']:.3f} coverage@{row['coverage_k']} {row['coverage']:.3f}")
    finally:
        if engine is not None:
            engine.close()
        if bar is not None:
            bar.stop()
    return [r for r in load_cells(out) if r.get("settings") == fp]


def _load_engine(m: Matrix, g: Group, cfg: Any) -> Any:
    python = m.python_for(g.engine)
    if python:
        from natix.engines.worker import RemoteEngine

        engine = RemoteEngine(python=python, engine=g.engine)
    else:
        from natix.engines.base import create_engine

        engine = create_engine(g.engine)
    engine.load(cfg)
    return engine


def _progress(enabled: bool, total: int) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    bar.start()
    return bar, bar.add_task("bench", total=total)
