"""User Python files a matrix names (``plugins: [my_engine.py]``) or a task file's verifier
(``verifier: checks.py:score``), imported by path so a user extends natix-bench without packaging
anything: a plugin registers engines (:func:`natix.engines.base.register_engine`), tasks
(:func:`natix.bench.tasks.register_task`) or extractors at import. Worker processes import the
same files before they run a cell."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

_LOADED: dict[str, ModuleType] = {}


def load_file(path: str | Path) -> ModuleType:
    """Import the Python file ``path`` once per process (by its resolved path)."""
    from natix.bench.matrix import BenchError

    p = Path(path).resolve()
    if str(p) in _LOADED:
        return _LOADED[str(p)]
    if not p.is_file():
        raise BenchError(f"plugin {path} is not a file")
    name = "natix_plugin_" + hashlib.sha256(str(p).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise BenchError(f"plugin {path} cannot be imported (not a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: say where, in one line
        del sys.modules[name]
        raise BenchError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from e
    _LOADED[str(p)] = module
    return module


def load_plugins(paths: Iterable[str]) -> None:
    for p in paths:
        load_file(p)


def load_function(ref: str, *, base: Path | None = None, what: str = "function") -> Callable[..., Any]:
    """``file.py:name`` -> that callable (a relative file is found from ``base``)."""
    from natix.bench.matrix import BenchError

    file, sep, name = ref.rpartition(":")
    if not sep or not file or not name:
        raise BenchError(f"{what} {ref!r} must be FILE.py:FUNCTION")
    p = Path(file)
    if not p.is_absolute() and base is not None:
        p = base / p
    fn = getattr(load_file(p), name, None)
    if not callable(fn):
        raise BenchError(f"{what} {ref!r}: {p} has no function {name!r}")
    return fn
