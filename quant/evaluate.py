"""``natix-quant eval``: perplexity and task accuracy of a model or artifact through the reference path.

Perplexity reads held-out text in non-overlapping windows of ``max_length`` tokens (each window
starts with an empty cache, the first token of a window is context only), through the same KV-cache
quantization the artifact declares (``model.natix_kv_cache``: int4 / fp8 caches store quantized
keys and values, so attention reads them as a served model would). The default text is the held-out
half of the ``pydoc`` corpus (:func:`natix.quant.calib.heldout_text`), never used for calibration.

Task accuracy runs the benchmark runner (:func:`natix.bench.runner.run_matrix`) with the hf engine (or
``--engine natix``, natix's own engine) on the task's evaluation split, so the numbers, intervals and environment records are the same as
``natix-bench run``'s.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from natix.quant.errors import QuantError


def read_text(source: str) -> str:
    """``pydoc`` (held-out half) or a UTF-8 text file."""
    from natix.quant.calib import BUILTIN_TEXT, heldout_text

    if source == BUILTIN_TEXT:
        return heldout_text()
    p = Path(source)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantError(f"cannot read perplexity text {p}: {e}") from e
    if not text.strip():
        raise QuantError(f"perplexity text {p} is empty")
    return text


def perplexity(model: Any, tokenizer: Any, text: str, *, max_length: int = 512,
               max_windows: int | None = None, progress: Any = None) -> dict[str, Any]:
    """exp(mean token NLL) over ``text`` cut into ``max_length``-token windows (the first
    ``max_windows``; None: all). ``progress(done, total)`` after each window."""
    import torch

    from natix.engines.kv_cache import cache_argument
    from natix.quant.kv_quant import new_cache

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) > 1][:max_windows]
    if not windows:
        raise QuantError("perplexity text has fewer than 2 tokens")
    dev = next(model.parameters()).device
    cache_kw = cache_argument(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, w in enumerate(windows):
            t = torch.tensor([w], device=dev)
            cache = new_cache(model, prefill="quantized")  # a window is a prefill: read KV as decode does
            kw = {cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
            logits = model(input_ids=t, **kw).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
            count += len(w) - 1
            if progress is not None:
                progress(i + 1, len(windows))
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows),
            "max_length": max_length, "kv_cache": getattr(model, "natix_kv_cache", "none")}


def check_eval(model: str, *, adapter: str | None, ppl: str, task: str | None, strategies: Sequence[str],
               items: int, temperature: float, device: str, dtype: str,
               jsonl: Path | None, engine: str = "hf") -> tuple[str, str | None, Any]:
    """Everything ``natix-quant eval`` can check before a model loads: the model (a quantized
    artifact's checkpoint is verified against its manifest) and adapter, the perplexity text, the
    task and strategies (as the benchmark matrix they become), the device, and ``jsonl`` (writable,
    not one of the inputs). Returns (scheme or "none", the text or None, the matrix or None)."""
    from natix.bench.matrix import Matrix, Variant
    from natix.quant.adapters import read_adapter
    from natix.quant.calib import BUILTIN_TEXT
    from natix.quant.checkpoint import verify_checkpoint
    from natix.quant.loader import artifact_config, quantized_scheme
    from natix.quant.models import resolve_base
    from natix.quant.validate import check_device, check_no_overlap, check_writable_dir

    from natix.engines.base import available_engines

    if engine not in ("hf", "natix"):
        raise QuantError(f"--engine must be hf or natix for eval (in-process engines of this environment), got "
                         f"{engine!r}; all engines: {', '.join(available_engines())}")
    scheme = quantized_scheme(model)
    if scheme:
        manifest, cfg = artifact_config(model)
        verify_checkpoint(Path(model), manifest, cfg)
        if adapter:
            raise QuantError(f"{model} is a quantized {scheme} artifact: an adapter cannot be merged into it at "
                             "load; merge it at export (natix-quant export --adapter)")
    else:
        resolve_base(model)
    if adapter:
        read_adapter(adapter)
    text = None if ppl == "none" else read_text(ppl)
    matrix = None
    if task:
        matrix = Matrix(name="eval", task=task, items=items, model=model, variants=(Variant("model", adapter),),
                        strategies=tuple(strategies), temperatures=(temperature,), device=device, dtype=dtype,
                        engines=(engine,))
    check_device(device)
    if jsonl is not None:
        ppl_file = None if ppl in ("none", BUILTIN_TEXT) else ppl
        check_no_overlap(jsonl, [("model", model), ("adapter", adapter), ("perplexity text", ppl_file)],
                         flag="--jsonl")
        check_writable_dir(jsonl.parent, what="--jsonl")
    return scheme or "none", text, matrix


def task_accuracy(matrix: Any, *, progress: bool = False, log: Any = None) -> list[dict[str, Any]]:
    """Cells (one per strategy) of a one-variant benchmark ``matrix`` (:func:`check_eval` builds it),
    with progress per generated sample when ``progress`` (lines through ``log``)."""
    from natix.bench.runner import run_matrix

    with tempfile.TemporaryDirectory(prefix="natix-eval-") as tmp:
        return run_matrix(matrix, Path(tmp), progress=progress, log=log or (lambda _s: None), isolate=False)


def summarize_cells(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """strategy -> accuracy, its 95% interval, coverage and items (the part a report needs)."""
    return {r["strategy"]: {"accuracy": r["accuracy"], "ci95": r["ci95"], "items": r["n_items"],
                            "coverage": r["coverage"], "coverage_k": r["coverage_k"],
                            "temperature": r["temperature"], "correct": r["per_item"]["correct"]}
            for r in rows}
