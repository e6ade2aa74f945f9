"""``natix-bench``: run the latency x accuracy matrix, render its report, compare two runs.

Every value is checked before anything is written or loaded (flag types here, the matrix in
:class:`natix.bench.matrix.Matrix`, the output directory, adapters, artifacts, model and device in
:func:`natix.bench.runner.preflight`); errors are one line, exit status 1 (2 for usage), and
``--debug`` shows the traceback (:mod:`natix.quant.cli_base`).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from natix.quant.cli_base import DEVICE, POSITIVE_INT, TEXT, FiniteFloat, NatixGroup, PathArg, debug_enabled, one_line
from natix.quant.errors import UserError

RUN_EPILOG = """\b
Examples:
  natix-bench run                          # smoke matrix (demo adapter, 16 items) -> runs/smoke-<time>/
  natix-bench run --full                   # the committed reports/matrix-cpu matrix
  natix-bench run --items 40 --strategy greedy --strategy maj@8 --temperature 0.3
  natix-bench run --scheme none --scheme fp8 --engine hf --engine natix
  natix-bench run --model my-base/ --variant mine=my-adapter/ --task-file items.jsonl
  natix-bench run --matrix m.yaml --out runs/sweep          # rerun the same --out to resume
  natix-bench run --matrix h200 --device cuda --shard 1/2   # half the groups on this machine

\b
Strategies (--strategy, repeatable):
  greedy                         one temperature-0 sample
  maj@N                          majority vote over N samples
  wmaj@N[:mean_logprob|sum_logprob]   vote weighted by the model's confidence
  boN:verifier|logprob|sum_logprob    best of N by the task's verifier or by logprob
  adaptive@N[:lead|beta,threshold=0.95,round=2,min=1]  vote, stop early once the answer is settled

\b
Schemes (--scheme): none (the variant as it is), bf16, fp16, fp32; fp8, gptq, w4a8kv4 (exported
by the run, cached by content hash); NAME=ARTIFACT_DIR (an artifact you exported).
KV (--kv): auto (the scheme's own), none, int4, fp8, or a kvpress press NAME:RATIO.
"""


def _variants(values: tuple[str, ...]) -> list[dict[str, str | None]] | None:
    """``base``, ``adapter`` (the demo adapter) or ``NAME=ADAPTER_DIR``."""
    if not values:
        return None
    out: list[dict[str, str | None]] = []
    for v in values:
        name, _, adapter = v.partition("=")
        out.append({"name": name, "adapter": adapter or ("demo" if name == "adapter" else None)})
    return out


def _schemes(values: tuple[str, ...]) -> list[object] | None:
    """``fp8`` or ``NAME=ARTIFACT_DIR``."""
    if not values:
        return None
    return [{"name": v.partition("=")[0], "artifact": v.partition("=")[2]} if "=" in v else v for v in values]


def _mapping(values: tuple[str, ...], flag: str) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k or not val:
            raise click.BadParameter(f"{v!r} is not ENGINE=PYTHON", param_hint=flag)
        out[k] = val
    return out


@click.group(cls=NatixGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="natix", prog_name="natix-bench")
def main() -> None:
    """Benchmark fine-tuned models: scheme x engine x KV x test-time strategy, latency beside accuracy."""


@main.command(epilog=RUN_EPILOG)
@click.option("--matrix", "matrix_file", type=TEXT, help="YAML matrix file, or a bundled one (smoke, full, ci, h200).")
@click.option("--full", is_flag=True, help="The full CPU matrix (reports/matrix-cpu's): same as --matrix full.")
@click.option("--name", type=TEXT, help="Matrix name (names the run directory).")
@click.option("--task", type=TEXT, help="Built-in task: chain_sum (arithmetic) or syllogism (yes/no).")
@click.option("--task-file", type=PathArg(dir_okay=False), help="Your own task: JSONL of {question, answer} lines.")
@click.option("--items", type=POSITIVE_INT, help="Evaluation items (smoke default 16; a task file: all of it).")
@click.option("--model", type=TEXT, help="Base model: directory, .gguf, or embedded name (default smollm2-135m).")
@click.option("--variant", "variants", multiple=True, type=TEXT,
              help="'base', 'adapter' (demo adapter) or NAME=ADAPTER_DIR; repeatable.")
@click.option("--scheme", "schemes", multiple=True, type=TEXT,
              help="none, bf16, fp8, gptq, w4a8kv4 or NAME=ARTIFACT_DIR; repeatable.")
@click.option("--engine", "engines", multiple=True, type=TEXT, help="hf, natix, vllm, openai-http; repeatable.")
@click.option("--kv", "--kv-press", "kv", multiple=True, type=TEXT,
              help="auto, none, int4, fp8, or a kv press NAME:RATIO (knorm:0.5); repeatable.")
@click.option("--temperature", "temperatures", multiple=True, type=FiniteFloat(min=0, min_open=True),
              help="Sampling temperature (> 0); repeatable.")
@click.option("--strategy", "strategies", multiple=True, type=TEXT, help="See the grammar below; repeatable.")
@click.option("--batch-size", "batch_sizes", multiple=True, type=POSITIVE_INT,
              help="Rows in flight (hf batch, natix/vllm max_num_seqs, openai-http concurrency); repeatable.")
@click.option("--max-tokens", "max_tokens", multiple=True, type=POSITIVE_INT,
              help="Generation limit (default: the task's); repeatable.")
@click.option("--few-shot", "few_shot", multiple=True, type=click.IntRange(min=0),
              help="Worked training examples before each question (longer prompts); repeatable.")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--device", type=DEVICE, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(("auto", "fp32", "bf16", "fp16")), help="dtype of scheme 'none' weights.")
@click.option("--python", type=TEXT, help="Run engines in a worker with this interpreter (e.g. .venvs/kvpress/bin/python).")
@click.option("--engine-python", "engine_python", multiple=True, type=TEXT,
              help="ENGINE=PYTHON: that engine's interpreter (its own venv); repeatable.")
@click.option("--cell-timeout", "cell_timeout_s", type=FiniteFloat(min=0, min_open=True),
              help="Seconds one engine load (its draws) may take before it is killed and recorded (default 3600).")
@click.option("--plugin", "plugins", multiple=True, type=PathArg(dir_okay=False, exists=True),
              help="Python file imported first (registers engines, tasks, extractors); repeatable.")
@click.option("--out", type=PathArg(file_okay=False),
              help="Output directory (default: a new runs/<name>-<time>/); an existing run there resumes.")
@click.option("--fresh", is_flag=True, help="Discard cells already in --out instead of resuming.")
@click.option("--shard", type=TEXT, help="I/N: run every N-th engine load starting at the I-th (spread over machines).")
@click.option("--no-progress", is_flag=True, help="No progress display (results are still printed).")
def run(matrix_file: str | None, full: bool, out: str | None, fresh: bool, no_progress: bool, shard: str | None,
        **flags: object) -> None:
    """Run the matrix and write cells.jsonl, report.md and report.html into the run directory."""
    from natix.bench.matrix import Matrix
    from natix.bench.plan import parse_shard
    from natix.bench.report import write_report
    from natix.bench.runner import CELLS_FILE, MATRIX_FILE, default_out, run_matrix

    if full and matrix_file:
        raise click.UsageError("--full is --matrix full: give one of them")
    matrix_file = "full" if full else matrix_file
    flags["variants"] = _variants(flags["variants"])  # type: ignore[arg-type]
    flags["schemes"] = _schemes(flags["schemes"])  # type: ignore[arg-type]
    flags["engine_python"] = _mapping(flags["engine_python"], "--engine-python")  # type: ignore[arg-type]
    flags = {k: (v or None) if isinstance(v, tuple) else v for k, v in flags.items()}
    base = Matrix.from_yaml(matrix_file) if matrix_file else Matrix()
    if flags.get("task_file") and flags.get("items") is None:
        from natix.bench.task_file import load_task_file

        flags["items"] = len(load_task_file(str(flags["task_file"])).items("eval", 10**9))
    m = Matrix.from_mapping(flags, base)
    shard_t = parse_shard(shard) if shard else None
    out_dir = Path(out) if out else default_out(m)
    if shard_t and not out:
        out_dir = out_dir.with_name(out_dir.name + f"-shard{shard_t[0]}of{shard_t[1]}")
    command = shlex.join(["natix-bench", *sys.argv[1:]]) if "run" in sys.argv[1:] else None
    from natix.bench.matrix import bundled_matrices

    inputs = [("matrix file", matrix_file if matrix_file not in bundled_matrices() else None)]
    try:
        rows = run_matrix(m, out_dir, progress=not no_progress, log=lambda s: click.echo(s, err=True), fresh=fresh,
                          inputs=inputs, shard=shard_t, command=command)
    except (ValueError, FileNotFoundError) as e:  # what engines raise for a request they cannot serve
        if isinstance(e, UserError) or debug_enabled():
            raise
        raise click.ClickException(one_line(str(e))) from e
    matrix = json.loads((out_dir / MATRIX_FILE).read_text(encoding="utf-8"))
    path = write_report(out_dir, rows, matrix=matrix)
    from natix.bench.report import answer

    click.echo(answer(rows))
    click.echo(f"report: {path} and {out_dir / 'report.html'}  (cells: {out_dir / CELLS_FILE}; rerun with "
               f"--out {out_dir} to resume or extend)")


@main.command()
@click.argument("out", type=PathArg(exists=True, file_okay=False))
@click.option("--summary", is_flag=True, help="Print the one-line answer and a compact table (Markdown) instead.")
def report(out: str, summary: bool) -> None:
    """Re-render OUT/report.md and OUT/report.html from OUT/cells.jsonl (the rows of OUT/matrix.json's settings)."""
    from natix.bench.matrix import BenchError
    from natix.bench.report import write_report
    from natix.bench.runner import MATRIX_FILE, load_cells, settings_from_file

    rows = load_cells(Path(out))
    try:
        matrix = json.loads((Path(out) / MATRIX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        matrix = None  # no readable matrix.json: render every row
    fp = settings_from_file(matrix) if isinstance(matrix, dict) else None
    if fp is not None:
        rows = [r for r in rows if r["settings"] == fp] or rows
    if not rows:
        raise BenchError(f"{out} has no cells.jsonl rows")
    if summary:
        from natix.bench.report import summary as render_summary

        click.echo(render_summary(rows))
        return
    click.echo(str(write_report(Path(out), rows, matrix=matrix if isinstance(matrix, dict) else None)))


@main.command()
@click.argument("run_a", type=PathArg(exists=True, file_okay=False))
@click.argument("run_b", type=PathArg(exists=True, file_okay=False))
def compare(run_a: str, run_b: str) -> None:
    """Paired accuracy differences (B - A, same items) and latency ratios (B / A) of the cells two runs share."""
    from natix.bench.compare import compare_runs, render_comparison

    click.echo(render_comparison(compare_runs(Path(run_a), Path(run_b)), run_a, run_b))


from natix.bench.serve_load import serve_load  # noqa: E402 - a light import (click only)

main.add_command(serve_load)

if __name__ == "__main__":  # pragma: no cover
    main()
