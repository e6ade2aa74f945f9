"""Fixtures for the benchmark's CLI tests: a tiny random model that really generates.

The model is the engines tests' tiny Llama with its character tokenizer (built by
``tests/engines/conftest.py``, loaded here by path: conftest files are not importable under
``--import-mode=importlib``), so the benchmark runs end to end through the hf engine in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("_natix_engines_conftest",
                                                  Path(__file__).resolve().parents[1] / "engines" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_tiny_llama(tmp_path_factory.mktemp("bench-model") / "model")
