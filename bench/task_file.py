"""A task from a JSONL file, so a user evaluates on their own data without writing Python.

One item per line: ``{"question": "...", "answer": "..."}`` with optional ``"id"`` (default: the line
number) and ``"system"`` (this item's chat system prompt). An optional first line
``{"task": {...}}`` sets the whole file's options:

- ``name``: shown in reports (default: the file name);
- ``extractor``: ``number`` (default), ``yesno``, ``choice`` or ``regex:PATTERN`` (group 1 is the answer);
- ``system``: the chat system prompt of every item;
- ``few_shot``: ``[{"question": ..., "answer": ...}, ...]`` worked examples shown before each question;
- ``verifier``: ``FILE.py:FUNCTION`` (relative to the task file), ``FUNCTION(question, completion_text) ->
  float``, a score without the gold answer, for ``boN:verifier``;
- ``max_tokens``: the generation limit (default 256).

Every line is checked when the file is read, before any model loads; an error names the file and
line: not JSON, not an object, a missing or empty ``question`` / ``answer``, a gold answer the
extractor cannot read (``"maybe"`` for a yes/no task), a repeated id, an unknown option.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from natix.bench.matrix import BenchError
from natix.bench.tasks import Item, Task

_OPTIONS = {"name", "extractor", "system", "few_shot", "verifier", "max_tokens"}
_ITEM_KEYS = {"question", "answer", "id", "system"}


class FileTask(Task):
    """A task whose items come from a file (see the module docstring)."""

    def __init__(self, path: Path, items: list[Item], *, name: str, extractor: str, system: str | None,
                 few_shot: list[tuple[str, str]], verifier: Any, max_tokens: int) -> None:
        self.path, self._items, self.name = path, items, name
        self.kind, self.system, self._shots, self._verifier = extractor, system, few_shot, verifier
        self.max_tokens = max_tokens

    def items(self, split: str, n: int, seed: int = 0) -> list[Item]:
        return self._items[:n]

    def few_shot(self) -> list[tuple[str, str]]:
        return list(self._shots)

    def shots(self, k: int, seed: int = 0) -> list[tuple[str, str]]:
        raise BenchError(f"task file {self.path} has no training split for the few_shot axis; put worked examples "
                         "in its few_shot option")

    def system_for(self, item: Item) -> str | None:
        return item.meta.get("system") or self.system

    def verify(self, item: Item, text: str) -> float:
        return float(self._verifier(item.question, text))

    @property
    def has_verifier(self) -> bool:
        return self._verifier is not None


def _text(where: str, key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or (isinstance(v, str) and not v.strip()):
        raise BenchError(f"{where}: '{key}' must be a non-empty string, got {v!r}")
    return str(v)


def load_task_file(path: str | Path) -> FileTask:
    """Read and check ``path`` (see the module docstring); raises :class:`BenchError` naming the line."""
    from natix.scaling.extract import get_extractor

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BenchError(f"task file {p} does not exist") from None
    except IsADirectoryError:
        raise BenchError(f"task file {p} is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise BenchError(f"task file {p} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise BenchError(f"cannot read task file {p}: {e.strerror}") from e
    opts: dict[str, Any] = {}
    parsed: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where} is not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BenchError(f"{where} must be a JSON object with 'question' and 'answer', got {type(obj).__name__}")
        if "task" in obj and not parsed and not opts:
            if set(obj) != {"task"} or not isinstance(obj["task"], dict):
                raise BenchError(f"{where}: the options line is {{\"task\": {{...}}}} and nothing else")
            opts = obj["task"]
            unknown = sorted(set(opts) - _OPTIONS)
            if unknown:
                raise BenchError(f"{where}: unknown task options {unknown}; known: {sorted(_OPTIONS)}")
            continue
        parsed.append((n, obj))
    if not parsed:
        raise BenchError(f"task file {p} has no items (one JSON object per line: question, answer)")
    extractor = opts.get("extractor", "number")
    try:
        ex = get_extractor(_text(f"{p} options", "extractor", extractor))
    except (ValueError, TypeError) as e:
        raise BenchError(f"{p} options: extractor {extractor!r}: {e}") from e
    normalize = getattr(ex, "normalize", ex)
    items: list[Item] = []
    ids: dict[str, int] = {}
    for n, obj in parsed:
        where = f"{p}:{n}"
        unknown = sorted(set(obj) - _ITEM_KEYS)
        if unknown:
            raise BenchError(f"{where}: unknown keys {unknown}; an item has question, answer, and optionally id, system"
                             + (" (file options go in a first line {\"task\": {...}})" if "task" in obj else ""))
        for key in ("question", "answer"):
            if key not in obj:
                raise BenchError(f"{where}: '{key}' is missing")
        q, a = _text(where, "question", obj["question"]), _text(where, "answer", obj["answer"])
        if isinstance(obj["answer"], bool):
            raise BenchError(f"{where}: 'answer' must be text (\"yes\", \"12\"), got {obj['answer']!r}")
        if normalize(a) is None:
            raise BenchError(f"{where}: the answer {a!r} is not something the {extractor} extractor reads "
                             "(so no completion could ever match it)")
        item_id = _text(where, "id", obj["id"]) if "id" in obj else f"line{n}"
        if item_id in ids:
            raise BenchError(f"{where}: id {item_id!r} was already used on line {ids[item_id]}")
        ids[item_id] = n
        system = _text(where, "system", obj["system"]) if obj.get("system") is not None else None
        items.append(Item(item_id, q, a, {"system": system, "line": n}))
    shots = []
    for i, s in enumerate(opts.get("few_shot") or []):
        if not isinstance(s, dict) or not {"question", "answer"} <= set(s):
            raise BenchError(f"{p} options: few_shot[{i}] must be an object with question and answer")
        shots.append((_text(f"{p} few_shot[{i}]", "question", s["question"]),
                      _text(f"{p} few_shot[{i}]", "answer", s["answer"])))
    verifier = None
    if opts.get("verifier") is not None:
        from natix.bench.plugins import load_function

        verifier = load_function(_text(f"{p} options", "verifier", opts["verifier"]), base=p.parent, what="verifier")
    max_tokens = opts.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BenchError(f"{p} options: max_tokens must be an integer >= 1, got {max_tokens!r}")
    system = _text(f"{p} options", "system", opts["system"]) if opts.get("system") is not None else None
    name = _text(f"{p} options", "name", opts["name"]) if opts.get("name") is not None else p.stem
    return FileTask(p, items, name=name, extractor=extractor, system=system, few_shot=shots, verifier=verifier,
                    max_tokens=max_tokens)
