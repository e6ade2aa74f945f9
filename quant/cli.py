"""``natix-quant``: command-line entry to natix.quant (a click group: ``merge``, ``export``, ``inspect``).

Thin by design: argument parsing, progress display and error reporting live here, the work in
:mod:`natix.quant.adapters`, :mod:`natix.quant.models` and :mod:`natix.quant.artifact`. torch,
transformers and peft are imported inside the commands so ``natix-quant --help`` is instant.
Every expected failure becomes one line on stderr and a non-zero exit, with nothing written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from natix.quant.errors import QuantError

DTYPES = ("bf16", "fp16", "fp32")


def _console():  # rich is imported lazily: only commands that do work need it
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our known failures into a one-line ``click.ClickException`` (exit status 1)."""
    from natix.quant.models import ModelLoadError

    try:
        yield
    except (QuantError, ModelLoadError) as e:
        raise click.ClickException(re.sub(r"\s+", " ", str(e)).strip()) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="natix", prog_name="natix-quant")
def main() -> None:
    """Merge PEFT adapters into base models, quantize and export them."""


@main.command()
@click.option("--base", "base", required=True, metavar="B",
              help="Base model: HF directory, .gguf file, or embedded name (smollm2-135m).")
@click.option("--adapter", "adapter", required=True, metavar="A",
              help="PEFT adapter directory (adapter_config.json + adapter weights).")
@click.option("--out", "out", required=True, metavar="DIR", type=click.Path(path_type=Path),
              help="Output directory for the merged model (must not exist unless --force).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="dtype of the saved weights; the merge itself always runs in fp32.")
@click.option("--tolerance", type=float, default=None,
              help="Max relative logit error merged vs unmerged (default 1e-4).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new one is complete).")
def merge(base: str, adapter: str, out: Path, dtype: str, tolerance: float | None, force: bool) -> None:
    """Merge adapter A into base B and write a standalone model to DIR, atomically."""
    from rich.markup import escape

    from natix.quant.adapters import FP32_REL_TOL, read_adapter

    console = _console()
    with _user_errors():
        if out.exists() and not force:
            raise click.ClickException(f"output {out} already exists; pass --force to replace it")
        files = read_adapter(adapter)  # fail on bad adapter files before the slow base load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # rich's status line is the progress display here
        with console.status(f"loading base {base}"):
            from natix.quant.models import load_base

            model, tokenizer = load_base(base, dtype="fp32")
        with console.status(f"merging {files.peft_type} adapter {adapter}"):
            from natix.quant.adapters import merge_adapter

            merged, report = merge_adapter(
                model, adapter, tolerance=FP32_REL_TOL if tolerance is None else tolerance)
        for w in report.peft_warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(w)}")
        with console.status(f"writing {out}"):
            _write_merged(merged, tokenizer, out, base=base, adapter=adapter, dtype=dtype,
                          report=report, force=force)
    err = "unchecked" if report.parity_error is None else f"{report.parity_error:.2e}"
    console.print(f"[green]merged[/green] {report.adapter_type} ({len(report.targets)} modules, "
                  f"parity {err} ≤ {report.tolerance:.0e}) -> {escape(str(out))} ({dtype})")


def _write_merged(model, tokenizer, out: Path, *, base: str, adapter: str, dtype: str, report, force: bool) -> None:
    """Cast, save model + tokenizer + manifest into a temp dir, then move it to ``out``."""
    from natix.quant.artifact import Manifest, SourceRef, atomic_dir, write_manifest
    from natix.quant.models import _dtype, resolve_base, tree_sha256

    src = resolve_base(base)
    base_file = src.path / src.gguf_file if src.gguf_file else src.path
    manifest = Manifest(
        scheme="merged",
        base=SourceRef(spec=base, sha256=tree_sha256(base_file)),
        adapter=SourceRef(spec=str(Path(adapter).resolve()), sha256=tree_sha256(Path(adapter)), type=report.adapter_type),
        dtype=dtype,
        details={"merge": report.to_dict()},
    )
    model = model.to(_dtype(dtype))
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, manifest)


@main.command()
@click.option("--base", "base", required=True, metavar="B",
              help="Base model: HF directory, .gguf file, or embedded name (smollm2-135m).")
@click.option("--adapter", "adapter", default=None, metavar="A",
              help="Optional PEFT adapter directory, merged (parity-checked) before quantizing.")
@click.option("--scheme", "scheme", required=True, metavar="S", help="Quantization scheme (fp8).")
@click.option("--out", "out", required=True, metavar="DIR", type=click.Path(path_type=Path),
              help="Output artifact directory (must not exist unless --force).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True,
              help="dtype of the tensors left unquantized (embeddings, norms, lm_head, biases).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new one is complete).")
def export(base: str, adapter: str | None, scheme: str, out: Path, dtype: str, force: bool) -> None:
    """Quantize base B (+ adapter A) with scheme S and write a servable artifact to DIR, atomically."""
    from rich.markup import escape

    from natix.quant.schemes import scheme_class

    console = _console()
    with _user_errors():
        cfg = scheme_class(scheme)()  # unknown scheme: fails before anything is loaded
        from natix.quant.export import export as run_export

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with console.status("starting") as st:
            def progress(i: int, n: int, name: str) -> None:
                st.update(f"quantizing {i}/{n} {escape(name)}")

            res = run_export(base, cfg, out, adapter=adapter, dtype=dtype, force=force,
                             status=lambda m: st.update(escape(m)), progress=progress)
    console.print(f"[green]exported[/green] {scheme}: {len(res.quantized)} linear layers quantized, "
                  f"{len(res.skipped)} kept ({', '.join(res.skipped) or 'none'}) -> {escape(str(out))} "
                  f"({res.bytes_written / 2**20:.1f} MiB)")


@main.command()
@click.argument("artifact", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of tables.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Describe a quantized artifact: scheme, bits per weight, files, engines, manifest."""
    import json

    from natix.quant.loader import describe_artifact

    with _user_errors():
        info = describe_artifact(artifact)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(100, Console().width))
    t = Table(title=f"natix artifact {info['path']}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    m = info["manifest"]
    eff_q, eff_all = info["effective_bits_quantized"], info["effective_bits_all"]
    t.add_row("scheme", info["scheme"])
    t.add_row("quant config", json.dumps(info["quant_config"]))
    t.add_row("bits per weight", f"{info['bits_per_weight']:g} (quantized layers incl. scales: "
              f"{eff_q:.3f}; whole checkpoint: {eff_all:.2f})" if eff_q else f"{info['bits_per_weight']:g}")
    t.add_row("quantized layers", str(info["quantized_layers"]))
    t.add_row("tensor dtypes", ", ".join(f"{k}: {v}" for k, v in sorted(info["tensor_dtypes"].items())))
    t.add_row("base", f"{m['base']['spec']} sha256:{m['base']['sha256'][:16]}")
    t.add_row("adapter", f"{m['adapter']['spec']} ({m['adapter']['type']}) sha256:{m['adapter']['sha256'][:16]}"
              if m.get("adapter") else "none")
    t.add_row("dtype (unquantized)", m["dtype"])
    t.add_row("created", f"{m['created']} natix {m['natix_version']}")
    libs = {**m.get("libraries", {}), **m.get("details", {}).get("libraries", {})}
    t.add_row("libraries", ", ".join(f"{k} {v}" for k, v in libs.items()))
    console.print(t)
    e = Table(title="engines that can load it")
    e.add_column("engine", style="bold")
    e.add_column("how")
    for name, how in info["engines"].items():
        e.add_row(name, how)
    console.print(e)
    f = Table(title="files")
    f.add_column("file")
    f.add_column("bytes", justify="right")
    for name, size in info["files"].items():
        f.add_row(name, f"{size:,}")
    console.print(f)


if __name__ == "__main__":  # pragma: no cover
    main()
