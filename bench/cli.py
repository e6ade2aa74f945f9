"""``natix-bench``: run the latency/accuracy matrix and render its report.

    natix-bench run                              # default matrix on the embedded SmolLM2
    natix-bench run --matrix m.yaml --items 100  # YAML, then flags on top
    natix-bench report reports/bench-default     # re-render report.md from cells.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _variants(values: tuple[str, ...]) -> list[dict[str, str | None]] | None:
    """``base``, ``adapter`` (the demo adapter) or ``NAME=ADAPTER_DIR``."""
    if not values:
        return None
    out: list[dict[str, str | None]] = []
    for v in values:
        name, _, adapter = v.partition("=")
        out.append({"name": name, "adapter": adapter or ("demo" if name == "adapter" else None)})
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark fine-tuned models: scheme x engine x KV compression x test-time strategy."""


@main.command()
@click.option("--matrix", "matrix_file", type=click.Path(dir_okay=False), help="YAML matrix; flags override it.")
@click.option("--name", help="Matrix name (default: 'default', or the YAML's).")
@click.option("--task", help="Task name (default chain_sum).")
@click.option("--items", type=int, help="Evaluation items (default 40).")
@click.option("--model", help="Base model: directory, .gguf, or embedded name (default smollm2-135m).")
@click.option("--variant", "variants", multiple=True, help="'base', 'adapter' (demo adapter) or NAME=ADAPTER_DIR; repeatable.")
@click.option("--engine", "engines", multiple=True, help="Engine name; repeatable (default hf).")
@click.option("--kv-press", "kv_presses", multiple=True, help="'none' or NAME:RATIO (e.g. knorm:0.5); repeatable.")
@click.option("--temperature", "temperatures", multiple=True, type=float, help="Sampling temperature; repeatable.")
@click.option("--strategy", "strategies", multiple=True, help="greedy, maj@8, wmaj@8, bo8:verifier, bo8:logprob, adaptive@16 ...; repeatable.")
@click.option("--max-tokens", type=int, help="Generation limit (default: the task's).")
@click.option("--seed", type=int)
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--dtype", help="auto, fp32, bf16, fp16.")
@click.option("--python", help="Run engines in a worker with this interpreter (e.g. .venvs/kvpress/bin/python).")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default reports/bench-<name>).")
@click.option("--fresh", is_flag=True, help="Discard cells already in --out instead of resuming.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(matrix_file: str | None, out: str | None, fresh: bool, no_progress: bool, **flags: object) -> None:
    """Run the matrix (resumes: cells already in --out are skipped) and write report.md."""
    from natix.bench.matrix import Matrix
    from natix.bench.report import write_report
    from natix.bench.runner import CELLS_FILE, run_matrix

    flags["variants"] = _variants(flags["variants"])  # type: ignore[arg-type]
    flags = {k: (v or None) if isinstance(v, tuple) else v for k, v in flags.items()}
    try:
        base = Matrix.from_yaml(matrix_file) if matrix_file else Matrix()
        m = Matrix.from_mapping(flags, base)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    out_dir = Path(out) if out else Path("reports") / f"bench-{m.name}"
    if fresh and (out_dir / CELLS_FILE).exists():
        (out_dir / CELLS_FILE).unlink()
    from natix.quant.errors import QuantError
    from natix.quant.models import ModelLoadError

    try:
        rows = run_matrix(m, out_dir, progress=not no_progress and sys.stderr.isatty(),
                          log=lambda s: click.echo(s, err=True))
    except (ModelLoadError, QuantError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    path = write_report(out_dir, rows)
    click.echo(f"report: {path}  (cells: {out_dir / CELLS_FILE})")


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def report(out: str) -> None:
    """Re-render OUT/report.md from OUT/cells.jsonl."""
    from natix.bench.report import write_report
    from natix.bench.runner import load_cells

    rows = load_cells(Path(out))
    if not rows:
        raise click.ClickException(f"{out} has no cells.jsonl rows")
    click.echo(str(write_report(Path(out), rows)))


from natix.bench.serve_load import serve_load  # noqa: E402 - a light import (click only)

main.add_command(serve_load)

if __name__ == "__main__":  # pragma: no cover
    main()
