"""Progress of a run: per generated sample, with an ETA from the measured rate.

On a terminal: a rich bar for the whole run (samples done / to do, elapsed, remaining) and one for
the current step (a draw, an export's layers). Elsewhere (CI, a pipe, ``nohup``): plain log lines,
one when a step starts and then at most every ``every_s`` seconds while it runs, each with the
step's and the run's counts and the remaining time estimated from the samples generated so far.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``start(what, total, unit)`` a step, ``advance(k)`` within it, ``log(line)``; ``close()``.
    ``total_samples``: every sample the run will generate (the run's ETA is over those)."""

    def __init__(self, total_samples: int, *, tty: bool | None = None, enabled: bool = True,
                 write: Callable[[str], None] | None = None, every_s: float = 15.0) -> None:
        self.total = total_samples
        self.done = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._write = write or (lambda s: print(s, file=sys.stderr, flush=True))
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._gen_s = 0.0  # time spent in sample steps (exports and loads excluded from the rate)
        self._step: dict[str, Any] = {}
        self._bar: Any = None
        if enabled and self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._run = self._bar.add_task("run", total=total_samples or None, unit="samples",
                                           visible=total_samples > 0)
            self._cur = self._bar.add_task("", total=None, unit="", visible=False)

    # ------------------------------------------------------------------------------------------
    @property
    def step_unit(self) -> str | None:
        return self._step.get("unit")

    def eta(self) -> float | None:
        if self.done <= 0 or self._gen_s <= 0:
            return None
        return (self.total - self.done) * self._gen_s / self.done

    def start(self, what: str, total: int | None, unit: str | None) -> None:
        self._finish_step()
        self._step = {"what": what, "total": total, "unit": unit, "done": 0, "t0": time.monotonic(),
                      "last": time.monotonic()}
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.reset(self._cur, total=total, completed=0, description=what, unit=unit or "", visible=True)
            return
        size = f": {total} {unit}" if total and unit else ""
        eta = f", run ETA {_clock(self.eta())}" if unit == "samples" and self.done else ""
        self._line(f"{what}{size}{eta}")

    def advance(self, k: int, total: int | None = None) -> None:
        st = self._step
        if not st:
            return
        if total is not None and st.get("total") is None:
            st["total"] = total
        st["done"] += k
        if st["unit"] == "samples":
            self.done += k
        now = time.monotonic()
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._cur, completed=st["done"], total=st["total"])
            if st["unit"] == "samples":
                self._bar.update(self._run, completed=self.done)
            return
        if now - st["last"] >= self.every_s:
            st["last"] = now
            self._line(self._status())

    def _status(self) -> str:
        st = self._step
        took = time.monotonic() - st["t0"]
        of = f"/{st['total']}" if st.get("total") else ""
        rate = st["done"] / took if took > 0 else 0.0
        left = (st["total"] - st["done"]) / rate if st.get("total") and rate > 0 else None
        run = (f"; run {self.done}/{self.total} samples, ETA {_clock(self._eta_now())}"
               if st["unit"] == "samples" else "")
        return f"  {st['what']}: {st['done']}{of} {st['unit']}, {_clock(took)} elapsed, step ETA {_clock(left)}{run}"

    def _eta_now(self) -> float | None:
        st = self._step
        gen = self._gen_s + (time.monotonic() - st["t0"] if st.get("unit") == "samples" else 0.0)
        return (self.total - self.done) * gen / self.done if self.done and gen > 0 else None

    def _finish_step(self) -> None:
        st = self._step
        if st and st.get("unit") == "samples":
            self._gen_s += time.monotonic() - st["t0"]
        self._step = {}

    def log(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            self._write(line)

    def _line(self, text: str) -> None:
        self._write(f"[{_clock(time.monotonic() - self.t0)}] {text}")

    def close(self) -> None:
        self._finish_step()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
