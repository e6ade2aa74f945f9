"""Run a benchmark matrix: plan it, run each draw group in a worker process, write JSONL as cells finish.

Rows go to ``<out>/cells.jsonl``, one per cell, appended as soon as a draw finishes, so a rerun
resumes: cells already present with ``status: "ok"`` (same key, same matrix settings) are skipped;
failed cells are tried again. A draw that has to run again because a strategy was added to it is
redrawn whole and its rows replace the old ones (its strategies stay on one draw, and no cell is
ever in the file twice). Each row carries per-item correctness so reports can make *paired*
comparisons, and the environment (device, versions, git SHA).

Each draw group (one engine load) runs in its own process (:mod:`natix.bench.worker`) with the
matrix's ``cell_timeout_s``; a group that crashes or runs past it is killed and its unfinished
cells are written with ``status: "error"`` and the error, and the run goes on with the next group.
Cells that cannot exist (:func:`natix.bench.plan.exclusion`) are written with ``status:
"excluded"`` and the reason. ``shard=(i, n)`` runs every n-th group, so n machines share a matrix.

Before anything is written, :func:`preflight` checks the output directory (not inside the model or
an adapter, writable, empty or a previous natix-bench run, its cells file readable), the adapters,
artifacts, the model, the interpreters and the device; ``fresh`` then discards the old cells only
when the first new draw is written, so a run that fails early leaves them as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from natix.bench.matrix import BenchError, Matrix
from natix.quant.artifact import TMP_FILE_SUFFIX, write_text_atomic

CELLS_FILE = "cells.jsonl"
MATRIX_FILE = "matrix.json"
REPORT_FILE = "report.md"
HTML_FILE = "report.html"
#: what a run writes into its output directory (and may therefore overwrite there)
OUTPUT_FILES = (CELLS_FILE, MATRIX_FILE, REPORT_FILE, HTML_FILE)
_ROW_KEYS = ("key", "settings")


def settings_of(m: Matrix) -> dict[str, Any]:
    """What must match for a stored cell to count as already done."""
    d = m.to_dict()
    out = {k: d[k] for k in ("task", "items", "model", "seed", "top_p", "top_k", "dtype")}
    if m.task_file:
        import hashlib

        out["task"] = m.task_name
        out["task_file_sha256"] = hashlib.sha256(Path(m.task_file).read_bytes()).hexdigest()
    return out


def settings_from_file(matrix: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of a run's ``matrix.json`` (None if it is not one)."""
    try:
        return matrix["settings"]
    except (KeyError, TypeError):
        return None


def _row_id(row: dict[str, Any]) -> tuple[str, str]:
    return row["key"], json.dumps(row["settings"], sort_keys=True)


def load_cells(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/cells.jsonl``, one per (cell key, settings), the last written winning.
    A torn last line (a run killed mid-write) is ignored; any other bad line is a
    :class:`BenchError` naming it. Rows written before statuses existed count as ``ok``."""
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
        row.setdefault("status", "ok")
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
        if isinstance(m, dict) and {"name", "variants", "strategies"} <= set(m.get("matrix", m)):
            return True
    except (OSError, ValueError):
        pass
    try:
        return bool(load_cells(out))
    except BenchError:
        return False


def default_out(m: Matrix) -> Path:
    """A fresh directory for a run that names none: ``runs/<name>-<YYYYmmdd-HHMMSS>`` (never a
    committed report, never a previous run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{m.name}-{stamp}"
    k = 1
    while out.exists():
        k += 1
        out = Path("runs") / f"{m.name}-{stamp}-{k}"
    return out


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
    dirs += [(f"artifact of scheme {s.name!r}", s.artifact) for s in m.schemes if s.artifact]
    check_no_overlap(out, dirs, replaces=False)
    for name in OUTPUT_FILES:
        check_no_overlap(out / name, [*inputs, ("task file", m.task_file)], flag=f"--out's {name}")
    if out.is_dir() and any(out.iterdir()) and not _is_bench_dir(out):
        raise BenchError(f"--out {out} already holds files and is not a natix-bench output directory (no "
                         f"{MATRIX_FILE} of a previous run); give a new or empty directory")
    load_cells(out)  # a cells file we cannot resume from fails now, naming the line
    for v in m.variants:  # fail on a missing or broken adapter before any model loads
        if v.adapter_path():
            read_adapter(v.adapter_path())
    for s in m.schemes:
        if s.artifact:
            from natix.quant.loader import artifact_config

            if not Path(s.artifact).is_dir():
                raise BenchError(f"artifact {s.artifact} of scheme {s.name!r} is not a directory")
            artifact_config(s.artifact)  # a directory without a readable natix manifest fails here
    if not (model / "natix_manifest.json").is_file():
        resolve_base(m.model)
    for e in m.engines:
        python = m.python_for(e)
        if python is None:
            check_device(m.device)  # a worker's interpreter may see other devices than this one
        elif shutil.which(python) is None:  # a path, or a name on PATH
            raise BenchError(f"interpreter {python} for engine {e!r} is not an executable file")
    check_writable_dir(out, what="--out")  # last: its probe file touches the directory's mtime


def _group_row(cell: Any, m: Matrix, settings: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    from natix.bench.plan import describe

    return {"key": cell.key, "status": status, "matrix": m.name, "settings": settings, **describe(cell.group),
            "temperature": cell.temperature, "strategy": cell.strategy, "label": cell.label, "task": m.task_name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def run_matrix(m: Matrix, out: Path, *, progress: bool = True, log: Callable[[str], None] = print,
               fresh: bool = False, inputs: Sequence[tuple[str, str | Path | None]] = (),
               shard: tuple[int, int] | None = None, isolate: bool = True, command: str | None = None,
               tty: bool | None = None) -> list[dict[str, Any]]:
    """Run every cell of ``m`` not already in ``out`` (every cell, with ``fresh``: the old ones
    are discarded once the first new draw is written); return all rows of this matrix.
    ``isolate``: each group in a worker process (False: in this process, no timeout; for tests and
    engines registered only here). ``command``: the command line that reproduces the run."""
    from natix.bench.plan import plan
    from natix.bench.progress import Progress

    out = Path(out)
    preflight(m, out, inputs=inputs)
    p = plan(m, shard=shard)
    settings = settings_of(m)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a run killed while replacing one of them left its temp file
        (out / f".{name}{TMP_FILE_SUFFIX}").unlink(missing_ok=True)
    write_text_atomic(out / MATRIX_FILE, json.dumps({"matrix": m.to_dict(), "settings": settings, "command": command,
                                                     "shard": list(shard) if shard else None}, indent=2))
    _drop_torn_tail(out / CELLS_FILE)
    old = [] if fresh else [r for r in load_cells(out) if r["settings"] == settings]
    done = {r["key"] for r in old if r["status"] == "ok"}
    keys = {c.key for c in p.cells}

    def rows_now() -> list[dict[str, Any]]:
        order = {c.key: i for i, c in enumerate(p.cells)}
        rows = [r for r in load_cells(out) if r["settings"] == settings and r["key"] in keys]
        return sorted(rows, key=lambda r: order[r["key"]])

    # Status rows (excluded, failed) never discard old cells: only a finished draw does (fresh), and
    # the status rows written before it are carried into that rewrite.
    carried: list[dict[str, Any]] = []

    def write(rows: list[dict[str, Any]], status_only: bool = False) -> None:
        nonlocal fresh
        if status_only:
            carried.extend(rows)
            _write_rows(out / CELLS_FILE, rows, truncate=False)
            return
        _write_rows(out / CELLS_FILE, (carried if fresh else []) + rows, truncate=fresh)
        fresh = False  # the old cells are gone now; later draws append

    stated = {r["key"] for r in old if r["status"] == "excluded"}
    excluded = [_group_row(c, m, settings, "excluded", reason=p.excluded[c.key],
                           excluded="group" if c.group.key in p.excluded_groups else "cell")
                for c in p.cells if c.key in p.excluded and c.key not in stated]
    if excluded:
        write(excluded, status_only=True)
        for key, why in dict((r["key"].rsplit("/T=", 1)[0] if r["excluded"] == "group" else r["key"], r["reason"])
                             for r in excluded).items():
            log(f"{key}: excluded ({why})")

    todo: list[tuple[Any, list[dict[str, Any]], list[Any]]] = []  # group, draws, cells to write
    for g in p.groups:
        cells = [c for c in p.cells_of(g) if c.key not in done]
        draws: list[dict[str, Any]] = []
        greedy = [c for c in p.cells_of(g) if c.temperature == 0.0]
        if any(c in cells for c in greedy):
            draws.append({"temperature": None, "labels": [c.label for c in greedy]})
        for t in m.temperatures:
            sampled = [c for c in p.cells_of(g) if c.temperature == t]
            if any(c in cells for c in sampled):
                draws.append({"temperature": t, "labels": [c.label for c in sampled]})
        if draws:
            todo.append((g, draws, cells))
    if not todo:
        log(f"all cells of matrix {m.name!r} already in {out / CELLS_FILE}; nothing to run")
        return rows_now()

    items = len(m.load_task().items("eval", m.items, seed=m.seed))
    budgets = _budgets(m)
    total = sum(items * (1 if d["temperature"] is None else max(budgets[x] for x in d["labels"]))
                for _, draws, _ in todo for d in draws)
    bar = Progress(total, enabled=progress, tty=tty, write=log)
    log(f"{len(todo)} engine load(s), {total} samples to generate -> {out}")
    try:
        for g, draws, cells in todo:
            job = {"matrix": m.to_dict(), "group": g.key, "draws": draws, "settings": settings}
            written: set[str] = set()

            def on_event(ev: dict[str, Any]) -> None:
                kind = ev.get("event")
                if kind == "phase":
                    bar.start(ev["what"], ev.get("total"), ev.get("unit"))
                elif kind == "progress":
                    bar.advance(ev["done"], ev.get("total"))
                elif kind == "log":
                    bar.log(f"  {ev['message']}")
                elif kind == "rows":
                    write(ev["rows"])
                    for row in ev["rows"]:
                        written.add(row["key"])
                        bar.log(f"{row['key']}: accuracy {row['accuracy']:.3f} coverage@{row['coverage_k']} "
                                f"{row['coverage']:.3f}")

            error = _run_isolated(job, m.cell_timeout_s, on_event) if isolate else _run_inline(job, on_event)
            if error is not None:
                failed = [_group_row(c, m, settings, "error", error=error["message"], error_type=error["type"],
                                     stderr_tail=error.get("stderr_tail")) for c in cells if c.key not in written]
                if failed:
                    write(failed, status_only=True)
                bar.log(f"{g.key}: FAILED ({error['type']}: {error['message']}); {len(failed)} cell(s) recorded "
                        "as errors, going on")
    finally:
        bar.close()
    return rows_now()


def _budgets(m: Matrix) -> dict[str, int]:
    from natix.scaling import parse_strategy

    task = m.load_task()
    verifier = (lambda prompt, text: 0.0) if task.has_verifier else None
    return {s: parse_strategy(s, extractor=task.extractor, verifier=verifier).budget for s in m.strategies}


def _run_inline(job: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """The group in this process; an exception is reported like a worker's (user errors raise)."""
    from natix.bench.group import run_group
    from natix.quant.errors import UserError

    try:
        run_group(job, on_event)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - recorded in the cells, the run goes on
        return {"type": type(e).__name__, "message": str(e)}
    return None


def _run_isolated(job: dict[str, Any], timeout_s: float,
                  on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """The group in a worker process, killed (its whole process group) past ``timeout_s``. Returns
    None when it finished, else the error (type, message, stderr tail)."""
    # PASSIVE: OpenMP threads sleep instead of spinning when they wait, which a shared CPU needs
    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen([sys.executable, "-m", "natix.bench.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env=env, start_new_session=True)
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    tail: list[str] = []

    def read_events() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                events.put(json.loads(line))
            except json.JSONDecodeError:
                tail.append(line)
        events.put(None)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            del tail[:-40]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_events, read_stderr)]
    for t in readers:
        t.start()
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()  # stdin stays open: the worker exits when it closes (this process died)
    deadline = time.monotonic() + timeout_s
    error: dict[str, Any] | None = None
    finished = False
    try:
        while True:
            try:
                ev = events.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    error = {"type": "Timeout", "message": f"the group ran past cell_timeout_s={timeout_s:g} s and "
                                                           "was killed"}
                    break
                continue
            if ev is None:
                break
            if ev.get("event") == "error":
                error = {"type": ev["type"], "message": ev["message"]}
            elif ev.get("event") == "done":
                finished = True
            else:
                on_event(ev)
    finally:
        _kill(proc)
        for t in readers:
            t.join(timeout=5)
    if error is None and not finished:
        error = {"type": "WorkerDied", "message": f"the worker process exited with status {proc.returncode} "
                                                  "before finishing"}
    if error is not None:
        error["stderr_tail"] = "".join(tail[-20:])
        last = [x.strip() for x in tail if x.strip()]
        if error["type"] == "WorkerDied" and last:
            error["message"] += f": {last[-1]}"
    return error


def _kill(proc: subprocess.Popen) -> None:
    """Close the worker's stdin (it exits on EOF), give it 10 s, then kill its process group."""
    with contextlib.suppress(OSError):
        proc.stdin.close()  # type: ignore[union-attr]
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10 if proc.poll() is None else 0)
    # the whole process group: an engine worker the group started dies with it
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
