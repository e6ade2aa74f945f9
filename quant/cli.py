"""``natix-quant``: command-line entry to natix.quant (a click group: ``merge``, ``export``, ``inspect``, ``eval``).

Thin by design: argument parsing and progress display live here, the work in
:mod:`natix.quant.export`, :mod:`natix.quant.loader` and :mod:`natix.quant.evaluate`. torch,
transformers and peft are imported inside the commands so ``natix-quant --help`` is instant.
Every value is checked before any slow work (flag types here; inputs, outputs and their overlap in
:func:`natix.quant.export.check_inputs` and :func:`natix.quant.evaluate.check_eval`), and every
expected failure is one line on stderr, exit status 1 (2 for usage), with nothing written;
``--debug`` shows the traceback (:mod:`natix.quant.cli_base`).
"""

from __future__ import annotations

from pathlib import Path

import click

from natix.quant.cli_base import (
    DEVICE,
    POSITIVE_INT,
    TEXT,
    FiniteFloat,
    NatixGroup,
    OneLineUsageError,
    PathArg,
    progress_console,
)

DTYPES = ("bf16", "fp16", "fp32")


@click.group(cls=NatixGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="natix", prog_name="natix-quant")
def main() -> None:
    """Merge PEFT adapters into base models, quantize and export them."""


@main.command()
@click.option("--base", "base", required=True, metavar="B", type=TEXT,
              help="Base model: HF directory, .gguf file, or embedded name (smollm2-135m).")
@click.option("--adapter", "adapter", required=True, metavar="A", type=TEXT,
              help="PEFT adapter directory (adapter_config.json + adapter weights).")
@click.option("--out", "out", required=True, metavar="DIR", type=PathArg(path_type=Path),
              help="Output directory for the merged model (must not exist unless --force; never an input).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="dtype of the saved weights; the merge itself always runs in fp32.")
@click.option("--tolerance", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Max relative logit error merged vs unmerged (default 1e-4).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new one is complete).")
def merge(base: str, adapter: str, out: Path, dtype: str, tolerance: float | None, force: bool) -> None:
    """Merge adapter A into base B and write a standalone model to DIR, atomically."""
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    from natix.quant.export import merge as run_merge

    console = progress_console()
    hf_logging.disable_progress_bar()  # rich's status line is the progress display here
    with console.status("checking inputs") as st:
        report = run_merge(base, adapter, out, dtype=dtype, tolerance=tolerance, force=force,
                           status=lambda m: st.update(escape(m)))
    for w in report.peft_warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    err = "unchecked" if report.parity_error is None else f"{report.parity_error:.2e}"
    console.print(f"[green]merged[/green] {report.adapter_type} ({len(report.targets)} modules, "
                  f"parity {err} ≤ {report.tolerance:.0e}) -> {escape(str(out))} ({dtype})")


@main.command()
@click.option("--base", "base", required=True, metavar="B", type=TEXT,
              help="Base model: HF directory, .gguf file, or embedded name (smollm2-135m).")
@click.option("--adapter", "adapter", default=None, metavar="A", type=TEXT,
              help="Optional PEFT adapter directory, merged (parity-checked) before quantizing.")
@click.option("--scheme", "scheme", required=True, metavar="S", type=TEXT, help="Quantization scheme: fp8, gptq, w4a8kv4.")
@click.option("--out", "out", required=True, metavar="DIR", type=PathArg(path_type=Path),
              help="Output artifact directory (must not exist unless --force; never an input).")
@click.option("--group-size", type=int, default=None,
              help="Weight group size: w4a8kv4 128, 64, 32 or -1 (per output channel); gptq -1 or a power of two "
                   "16..1024. A layer it does not divide gets --set group_fallback (finer, channel or error).")
@click.option("--act-order", type=click.Choice(["group", "weight"]), default=None,
              help="GPTQ activation order (gptq): 'group' permutes groups (g_idx), 'weight' keeps them contiguous.")
@click.option("--kv", "kv", type=click.Choice(["none", "fp8", "int4"]), default=None,
              help="KV-cache quantization: fp8 (fp8, gptq; vLLM), int4 (w4a8kv4, the default there), none.")
@click.option("--calib", default="pydoc", show_default=True, metavar="TASK|FILE", type=TEXT,
              help="Calibration data: a task name (chain_sum), 'pydoc', or a .jsonl/.txt file.")
@click.option("--calib-samples", type=POSITIVE_INT, default=128, show_default=True, help="Calibration samples.")
@click.option("--calib-max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per calibration sample.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", type=TEXT,
              help="Any other scheme setting (e.g. --set rotate=false); repeatable. See inspect for the fields.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True,
              help="dtype of the tensors left unquantized (embeddings, norms, lm_head, biases).")
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling / rotation seed.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="Where calibrated schemes quantize each decoder layer (auto, cpu, cuda, cuda:N); the model "
                   "stays in host memory and one layer at a time moves to the device.")
@click.option("--force", is_flag=True, help="Replace --out if it exists (only after the new one is complete).")
def export(base: str, adapter: str | None, scheme: str, out: Path, group_size: int | None, act_order: str | None,
           kv: str | None, calib: str, calib_samples: int, calib_max_length: int, overrides: tuple[str, ...],
           dtype: str, seed: int, device: str, force: bool) -> None:
    """Quantize base B (+ adapter A) with scheme S and write a servable artifact to DIR, atomically."""
    from rich.markup import escape

    from natix.quant.export import grouped
    from natix.quant.schemes import make_config, parse_override

    console = progress_console()
    fields: dict[str, object] = dict(parse_override(o) for o in overrides)
    for key, value in (("group_size", group_size), ("actorder", act_order), ("kv_cache", kv)):
        if value is not None:
            fields[key] = value
    flags = {"group_size": "--group-size", "actorder": "--act-order", "kv_cache": "--kv"}
    cfg = make_config(scheme, fields, flags)  # unknown scheme/setting: fails before anything is loaded
    ctx = click.get_current_context()
    unused = [f"--{p.replace('_', '-')}" for p in ("calib", "calib_samples", "calib_max_length")
              if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
    if unused and not cfg.needs_calibration():
        console.print(f"[yellow]note:[/yellow] {scheme} with these settings needs no calibration: "
                      f"{', '.join(unused)} checked but not used")
    from transformers.utils import logging as hf_logging

    from natix.quant.export import export as run_export

    from natix.bench.progress import Progress

    hf_logging.disable_progress_bar()
    # a phase line per step, then the layers with the time left (measured per layer as they finish)
    bar = Progress(0, write=lambda line: click.echo(line, err=True))
    bar.start("checking inputs", None, None)

    def progress(i: int, n: int, name: str) -> None:
        if bar.step_unit != "layers":
            bar.start(f"quantizing ({scheme})", n, "layers")
        bar.advance(1)

    try:
        res = run_export(base, cfg, out, adapter=adapter, dtype=dtype, force=force, calib=calib,
                         calib_samples=calib_samples, calib_max_length=calib_max_length, seed=seed,
                         status=lambda m: bar.start(m, None, None), progress=progress, device=device)
    finally:
        bar.close()
    fallback: dict[int, list[str]] = {}  # group size -> layers that got it instead of cfg.group_size
    if grouped(cfg):
        for n, m in res.layers.items():
            if m.get("bits") != 8 and m.get("group_size") not in (None, cfg.group_size):
                fallback.setdefault(m["group_size"], []).append(n)
    vocab = [n for n, m in res.layers.items() if m.get("bits") == 8]  # w4a8kv4 embed_bits / lm_head_bits = 8
    console.print(f"[green]exported[/green] {scheme}: {len(res.quantized) - len(vocab)} linear layers quantized, "
                  + (f"{' and '.join(vocab)} in int8, " if vocab else "")
                  + f"{len(res.skipped)} kept ({', '.join(res.skipped) or 'none'}) -> {escape(str(out))} "
                  f"({res.bytes_written / 2**20:.1f} MiB)")
    for g, names in sorted(fallback.items(), reverse=True):
        how = "per output channel" if g == -1 else f"in groups of {g}"
        console.print(f"[yellow]note:[/yellow] {len(names)} layers have in_features not divisible by the "
                      f"group size {cfg.group_size} and were quantized {how} (group_fallback="
                      f"{cfg.group_fallback!r}; see the manifest's details.layers)")


@main.command()
@click.argument("artifact", metavar="DIR", type=PathArg(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of tables.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Describe a quantized artifact: scheme, bits per weight, files, engines, manifest."""
    import json

    from natix.quant.loader import describe_artifact

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
    total = info["quantized_bytes"] + info["unquantized_bytes"]
    big = ", ".join(f"{x['name']} {x['bytes'] / 2**20:.1f} MiB {x['dtype']}" for x in info["largest_unquantized"][:2])
    t.add_row("size", f"quantized layers {info['quantized_bytes'] / 2**20:.1f} MiB, everything else "
              f"{info['unquantized_bytes'] / 2**20:.1f} MiB of {total / 2**20:.1f} MiB (largest: {big})")
    heads = [x for x in info["largest_unquantized"] if x["name"].endswith(("embed_tokens.weight", "lm_head.weight"))]
    if total and sum(x["bytes"] for x in heads) > total / 3:
        t.add_row("why this size", "the embeddings" + (" and the untied lm_head" if len(heads) > 1 else "")
                  + f" stay {heads[0]['dtype']} and are {sum(x['bytes'] for x in heads) / total:.0%} of the checkpoint: "
                  "a small model's vocabulary dominates it, so 4-bit linears shrink it less than the bits suggest"
                  + (" (this scheme folds the final norm, and its rotation, into lm_head, so lm_head cannot share the "
                     "embedding's tensor)"
                     if len(heads) > 1 else ""))
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


@main.command("eval")
@click.argument("model", metavar="DIR", type=TEXT)
@click.option("--adapter", default=None, metavar="A", type=TEXT,
              help="PEFT adapter merged at load (unquantized baselines).")
@click.option("--ppl", "ppl", default="pydoc", show_default=True, metavar="FILE|pydoc|none", type=TEXT,
              help="Held-out text for perplexity ('none' to skip).")
@click.option("--ppl-max-length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per perplexity window.")
@click.option("--ppl-windows", type=click.IntRange(min=0), default=8, show_default=True,
              help="Perplexity over the first N windows (0: the whole text; pydoc has 40, ~25 s each on 2 CPU cores).")
@click.option("--task", default=None, type=TEXT, help="Task for accuracy (e.g. chain_sum); omitted: perplexity only.")
@click.option("--strategy", "strategies", multiple=True, type=TEXT,
              help="greedy, maj@8, bo8:verifier, ...; repeatable (default greedy; needs --task).")
@click.option("--items", type=POSITIVE_INT, default=40, show_default=True, help="Evaluation items.")
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=0.7, show_default=True,
              help="Temperature of sampled strategies (> 0).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(("auto",) + DTYPES), default="auto", show_default=True,
              help="dtype of unquantized tensors.")
@click.option("--jsonl", "jsonl", type=PathArg(dir_okay=False, path_type=Path), default=None,
              help="Append the result as one JSON line (with the environment) to this file.")
@click.option("--label", default=None, type=TEXT, help="Name of this row in the JSONL (default: DIR's name).")
@click.option("--engine", default="hf", show_default=True, type=TEXT,
              help="Engine for task accuracy: hf (the reference path) or natix (natix's engine and kernels); "
                   "perplexity always runs through the reference path.")
def eval_(model: str, adapter: str | None, ppl: str, ppl_max_length: int, ppl_windows: int | None, task: str | None,
          strategies: tuple[str, ...], items: int, temperature: float, device: str, dtype: str,
          jsonl: Path | None, label: str | None, engine: str) -> None:
    """Perplexity and task accuracy of artifact (or model) DIR (perplexity through natix's reference
    path; accuracy through --engine)."""
    import json
    import time

    from natix.quant.evaluate import check_eval, perplexity, summarize_cells, task_accuracy

    if strategies and not task:
        raise OneLineUsageError("--strategy needs --task (strategies are scored on a task's items)")
    console = progress_console()
    label = label or Path(model).name
    # everything that can be wrong is found before any model loads (the task and strategies too)
    scheme, text, matrix = check_eval(model, adapter=adapter, ppl=ppl, task=task, strategies=strategies or ("greedy",),
                                      items=items, temperature=temperature, device=device, dtype=dtype, jsonl=jsonl,
                                      engine=engine)
    row: dict[str, object] = {"label": label, "model": model, "adapter": adapter, "dtype": dtype, "scheme": scheme,
                              "engine": engine, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if text is not None:
        from transformers.utils import logging as hf_logging

        from natix.engines.hf_engine import resolve_device
        from natix.quant.models import load_base

        from natix.bench.progress import Progress

        hf_logging.disable_progress_bar()
        with console.status(f"loading {label} for perplexity"):
            m, tok = load_base(model, dtype=dtype, device=resolve_device(device))
            if adapter:
                from natix.quant.adapters import merge_adapter

                m, _ = merge_adapter(m, adapter)
        bar = Progress(0, write=lambda s: click.echo(s, err=True))
        bar.start(f"perplexity of {label} on {ppl} (windows of {ppl_max_length} tokens; --ppl none skips it)",
                  None, "windows")
        try:
            row["perplexity"] = {"text": ppl, **perplexity(
                m, tok, text, max_length=ppl_max_length, max_windows=ppl_windows or None,
                progress=lambda i, n: bar.advance(1, total=n))}
        finally:
            bar.close()
        del m
        console.print(f"{label}: perplexity {row['perplexity']['ppl']:.3f} "  # type: ignore[index]
                      f"({row['perplexity']['tokens']} tokens of {ppl})")  # type: ignore[index]
    if matrix is not None:
        console.print(f"{task} accuracy of {label}: {items} items, strategies {', '.join(strategies or ('greedy',))}")
        cells = task_accuracy(matrix, progress=True, log=lambda s: click.echo(s, err=True))
        row["task"] = {"name": task, "strategies": summarize_cells(cells)}
        row["env"] = cells[0]["env"] if cells else None
        for s, r in row["task"]["strategies"].items():  # type: ignore[index]
            lo, hi = r["ci95"]
            console.print(f"{label}: {task} {s}: {r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] ({r['items']} items)")
    if row.get("env") is None:
        from natix.bench.env import environment

        row["env"] = environment()
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
