"""Engines for the benchmark's tests, loaded as a natix-bench plugin (``plugins: [this file]``), so
worker processes have them too. Not a test module: its name does not start with test_, so pytest
collects nothing from it."""

from __future__ import annotations

import os
import time
from typing import Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, register_engine


@register_engine("constant-test")
class ConstantEngine:
    """Answers every prompt with ``cfg.extra["text"]`` (default "Yes."), one token per word."""

    def load(self, cfg: EngineConfig) -> None:
        self.text = cfg.extra.get("text", "Yes.")
        if cfg.extra.get("crash_on_load"):
            os._exit(7)  # a hard crash: no exception, no cleanup

    def info(self) -> dict:
        return {"engine": "constant-test", "device": "cpu", "kv_capacity_tokens": 1234}

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        if os.environ.get("NATIX_TEST_SLEEP"):
            time.sleep(float(os.environ["NATIX_TEST_SLEEP"]))
        ids = tuple(range(len(self.text.split())))
        return [[Completion(self.text, ids, tuple(-0.5 for _ in ids), "stop", Timing(0.01, 0.002, 0.02))
                 for _ in range(spec.n)] for _ in prompts]

    def close(self) -> None:
        pass
