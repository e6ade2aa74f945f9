"""``natix-bench``: run the latency/accuracy matrix and render its report.

    natix-bench run                              # default matrix on the embedded SmolLM2
    natix-bench run --matrix m.yaml --items 100  # YAML, then flags on top
    natix-bench report reports/bench-default     # re-render report.md from cells.jsonl

Every value is checked before anything is written or loaded (flag types here, the matrix in
:class:`natix.bench.matrix.Matrix`, the output directory, adapters, model and device in
:func:`natix.bench.runner.preflight`); errors are one line, exit status 1 (2 for usage), and
``--debug`` shows the traceback (:mod:`natix.quant.cli_base`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from natix.quant.cli_base import DEVICE, POSITIVE_INT, TEXT, FiniteFloat, NatixGroup, PathArg, debug_enabled, one_line
from natix.quant.errors import UserError


def _variants(values: tuple[str, ...]) -> list[dict[str, str | None]] | None:
    """``base``, ``adapter`` (the demo adapter) or ``NAME=ADAPTER_DIR``."""
    if not values:
        return None
    out: list[dict[str, str | None]] = []
    for v in values:
        name, _, adapter = v.partition("=")
        out.append({"name": name, "adapter": adapter or ("demo" if name == "adapter" else None)})
    return out


@click.group(cls=NatixGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark fine-tuned models: scheme x engine x KV compression x test-time strategy."""


@main.command()
@click.option("--matrix", "matrix_file", type=PathArg(dir_okay=False), help="YAML matrix; flags override it.")
@click.option("--name", type=TEXT, help="Matrix name (default: 'default', or the YAML's).")
@click.option("--task", type=TEXT, help="Task name (default chain_sum).")
@click.option("--items", type=POSITIVE_INT, help="Evaluation items (default 40).")
@click.option("--model", type=TEXT, help="Base model: directory, .gguf, or embedded name (default smollm2-135m).")
@click.option("--variant", "variants", multiple=True, type=TEXT,
              help="'base', 'adapter' (demo adapter) or NAME=ADAPTER_DIR; repeatable.")
@click.option("--engine", "engines", multiple=True, type=TEXT, help="Engine name; repeatable (default hf).")
@click.option("--kv-press", "kv_presses", multiple=True, type=TEXT,
              help="'none' or NAME:RATIO (e.g. knorm:0.5); repeatable.")
@click.option("--temperature", "temperatures", multiple=True, type=FiniteFloat(min=0, min_open=True),
              help="Sampling temperature (> 0); repeatable.")
@click.option("--strategy", "strategies", multiple=True, type=TEXT,
              help="greedy, maj@8, wmaj@8, bo8:verifier, bo8:logprob, adaptive@16 ...; repeatable.")
@click.option("--max-tokens", type=POSITIVE_INT, help="Generation limit (default: the task's).")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--device", type=DEVICE, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(("auto", "fp32", "bf16", "fp16")), help="dtype of the weights.")
@click.option("--python", type=TEXT, help="Run engines in a worker with this interpreter (e.g. .venvs/kvpress/bin/python).")
@click.option("--out", type=PathArg(file_okay=False), help="Output directory (default reports/bench-<name>).")
@click.option("--fresh", is_flag=True, help="Discard cells already in --out instead of resuming.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(matrix_file: str | None, out: str | None, fresh: bool, no_progress: bool, **flags: object) -> None:
    """Run the matrix (resumes: cells already in --out are skipped) and write report.md."""
    from natix.bench.matrix import Matrix
    from natix.bench.report import write_report
    from natix.bench.runner import CELLS_FILE, run_matrix

    flags["variants"] = _variants(flags["variants"])  # type: ignore[arg-type]
    flags = {k: (v or None) if isinstance(v, tuple) else v for k, v in flags.items()}
    base = Matrix.from_yaml(matrix_file) if matrix_file else Matrix()
    m = Matrix.from_mapping(flags, base)
    out_dir = Path(out) if out else Path("reports") / f"bench-{m.name}"
    try:
        rows = run_matrix(m, out_dir, progress=not no_progress and sys.stderr.isatty(),
                          log=lambda s: click.echo(s, err=True), fresh=fresh,
                          inputs=[("matrix file", matrix_file)])
    except (ValueError, FileNotFoundError) as e:  # what engines raise for a request they cannot serve
        if isinstance(e, UserError) or debug_enabled():
            raise
        raise click.ClickException(one_line(str(e))) from e
    path = write_report(out_dir, rows)
    click.echo(f"report: {path}  (cells: {out_dir / CELLS_FILE})")


@main.command()
@click.argument("out", type=PathArg(exists=True, file_okay=False))
def report(out: str) -> None:
    """Re-render OUT/report.md from OUT/cells.jsonl (the rows of OUT/matrix.json's settings)."""
    from natix.bench.matrix import BenchError
    from natix.bench.report import write_report
    from natix.bench.runner import MATRIX_FILE, load_cells, settings_of

    rows = load_cells(Path(out))
    try:
        fp = settings_of(json.loads((Path(out) / MATRIX_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        fp = None  # no readable matrix.json: render every row
    if fp is not None:
        rows = [r for r in rows if r["settings"] == fp] or rows
    if not rows:
        raise BenchError(f"{out} has no cells.jsonl rows")
    click.echo(str(write_report(Path(out), rows)))


from natix.bench.serve_load import serve_load  # noqa: E402 - a light import (click only)

main.add_command(serve_load)

if __name__ == "__main__":  # pragma: no cover
    main()
