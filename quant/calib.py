"""Calibration and held-out text: what GPTQ, smoothing and KV scales see, and what perplexity reads.

Sources (``--calib``):

- a registered benchmark task name (``chain_sum``): items of the task's *train* split, each
  formatted as the model will see it in serving — the chat prompt followed by the task's
  reference answer and EOS — so the calibration activations are in-distribution for an adapter
  trained on that task; evaluation items can never be drawn (the split is a hash of the text);
- ``pydoc``: English technical prose shipped with every CPython (``pydoc_data.topics``, ~465 kB).
  Topics alternate between a calibration half and a held-out half (:func:`heldout_text`), so
  perplexity is never measured on text the quantizer calibrated on;
- ``FILE.jsonl``: one JSON object per line with ``text`` (raw text), ``messages`` (a chat, run
  through the tokenizer's chat template) or ``prompt`` + ``completion``;
- ``FILE.txt``: plain text, tokenized and cut into ``max_length`` windows (from the first
  ``4 * samples`` windows' worth of characters: a huge file is never tokenized whole).

Every sample is a list of token ids of at most ``max_length``; only as much of each row's text as
can hold ``max_length`` tokens is tokenized (:func:`max_token_chars`), whatever the row's size. Bad input (missing, unreadable or
empty file, a line that is not JSON or has none of the keys) raises :class:`CalibrationError`
naming the file and line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from natix.quant.errors import QuantError

BUILTIN_TEXT = "pydoc"


class CalibrationError(QuantError):
    """The calibration source cannot be used; the message names it (and the line)."""


def _pydoc_topics(half: int) -> list[str]:
    import pydoc_data.topics as t

    # several topic names share one text: deduplicate before splitting, or a text could land in both halves
    texts = list(dict.fromkeys(t.topics[k] for k in sorted(t.topics)))
    return [x for i, x in enumerate(texts) if i % 2 == half]


def heldout_text() -> str:
    """The held-out half of the ``pydoc`` corpus (~230 kB): never used for calibration."""
    return "\n\n".join(_pydoc_topics(1))


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token covers (the longest vocabulary entry, at least
    16), so that ``n * max_token_chars`` characters of text always hold ``n`` tokens or more."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 64
    return max(16, max((len(t) for t in vocab), default=0))


def _ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The first ``max_length`` token ids of ``text``, tokenizing only a prefix long enough to hold
    them: a 69 MB one-line sample must cost what a 512-token one does, not 20 minutes and 10 GB."""
    text = text[: max_length * max_token_chars(tokenizer)]
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]


def _windows(tokenizer: Any, text: str, max_length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]


def _task_samples(name: str, tokenizer: Any, n: int, seed: int) -> list[str]:
    from natix.bench.tasks import get_task
    from natix.engines.chat import apply_chat

    task = get_task(name)
    eos = tokenizer.eos_token or ""
    return [apply_chat(tokenizer, task.user_text(it), system=task.system) + task.reference_answer(it) + eos
            for it in task.items("train", n, seed=seed + 1)]


def _jsonl_texts(path: Path, tokenizer: Any) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e}") from e
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise CalibrationError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        if isinstance(row.get("text"), str):
            out.append(row["text"])
        elif isinstance(row.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise CalibrationError(f"{path}:{i}: 'messages' needs a tokenizer with a chat template")
            out.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.append(row["prompt"] + row["completion"])
        else:
            raise CalibrationError(f"{path}:{i}: a row needs 'text', 'messages' or 'prompt'+'completion'")
    return out


def source_file(source: str) -> Path | None:
    """The file a ``--calib`` value names (None for a task name or ``pydoc``)."""
    from natix.bench.tasks import available_tasks

    return None if source == BUILTIN_TEXT or source in available_tasks() else Path(source)


def check_source(source: str) -> None:
    """Cheap validation before any model is loaded: a known name or a readable, non-empty file."""
    from natix.bench.tasks import available_tasks

    if source == BUILTIN_TEXT or source in available_tasks():
        return
    p = Path(source)
    if p.suffix not in (".jsonl", ".txt"):
        raise CalibrationError(f"calibration source {source!r} is neither a task ({', '.join(available_tasks())}), "
                               f"{BUILTIN_TEXT!r}, nor a .jsonl/.txt file")
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist")
    try:
        with p.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {p}: {e}") from e
    if not head.strip():
        raise CalibrationError(f"calibration file {p} is empty")


def check_sizes(samples: int, max_length: int) -> None:
    """``--calib-samples`` and ``--calib-max-length`` make sense (checked even when a scheme
    needs no calibration, so a wrong value is never silently accepted)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise CalibrationError(f"calib samples must be a positive integer, got {samples!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise CalibrationError(f"calib max_length must be an integer >= 2, got {max_length!r}")


def load_calibration(source: str, tokenizer: Any, *, samples: int = 128, max_length: int = 512,
                     seed: int = 0) -> list[list[int]]:
    """Up to ``samples`` token-id lists of at most ``max_length`` tokens from ``source``
    (see the module docstring), shuffled with ``seed`` where the source is longer than needed."""
    check_sizes(samples, max_length)
    check_source(source)
    from natix.bench.tasks import available_tasks

    if source in available_tasks():
        ids = [_ids(tokenizer, t, max_length) for t in _task_samples(source, tokenizer, samples, seed)]
    elif source == BUILTIN_TEXT:
        ids = _windows(tokenizer, "\n\n".join(_pydoc_topics(0)), max_length)
    elif source.endswith(".txt"):
        # windows come from the start of the file: read what 4x the samples can use, so a large
        # file is sampled from a good stretch of text without being tokenized whole
        budget = 4 * samples * max_length * max_token_chars(tokenizer)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read(budget)
        except (OSError, UnicodeDecodeError) as e:
            raise CalibrationError(f"cannot read calibration file {source}: {e}") from e
        ids = _windows(tokenizer, text, max_length)
    else:
        ids = [_ids(tokenizer, t, max_length) for t in _jsonl_texts(Path(source), tokenizer)]
    ids = [x for x in ids if len(x) > 1]
    if not ids:
        raise CalibrationError(f"calibration source {source!r} gave no sample of 2 or more tokens")
    if len(ids) > samples:
        ids = random.Random(seed).sample(ids, samples)
    return ids
