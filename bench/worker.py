"""A draw group in its own process: ``python -m natix.bench.worker`` reads one job (a JSON line on
stdin), runs it (:func:`natix.bench.group.run_group`) and writes its events as JSON lines on its
protocol channel (the original stdout; fd 1 is pointed at stderr so a library that prints cannot
corrupt it). The last event is ``done`` or ``error`` (type, message, traceback).

A process per group confines a crash, a leak, a hung kernel or the GPU memory of one engine load:
the parent (:mod:`natix.bench.runner`) kills it past the matrix's ``cell_timeout_s``, records
its cells as failed and goes on. The worker exits when its stdin closes (the parent died, even by
``kill -9``), so no orphan keeps computing.
"""

from __future__ import annotations

import json
import os
import sys
import threading


def _exit_when_orphaned() -> None:
    sys.stdin.read()  # returns at EOF: the parent closed our stdin or died
    os._exit(3)


def _idle_cores(window_s: float = 0.5) -> float | None:
    """Cores idle right now (Linux /proc/stat over ``window_s``), or None where unknown."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        i0, t0 = sample()
        time.sleep(window_s)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (i1 - i0) / max(1, t1 - t0)


def _threads() -> int:
    """Torch threads for this worker: NATIX_BENCH_THREADS if set, else the cores the machine's other
    work leaves idle (measured for half a second as the worker starts), at least 1. On a shared
    2-core machine, two OpenMP threads waiting on a busy core made generation up to 10x slower than
    one thread (measured: 10 vs 95 tokens/s on SmolLM2-135M)."""
    if os.environ.get("NATIX_BENCH_THREADS", "").isdigit():
        return max(1, int(os.environ["NATIX_BENCH_THREADS"]))
    cores = os.cpu_count() or 1
    idle = _idle_cores()
    return cores if idle is None else max(1, min(cores, round(idle)))


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = json.loads(sys.stdin.readline())
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()
    lock = threading.Lock()

    def emit(event: dict) -> None:
        with lock:
            proto.write(json.dumps(event) + "\n")
            proto.flush()

    try:
        threads = _threads()
        import torch

        torch.set_num_threads(threads)
        emit({"event": "log", "message": f"torch threads: {threads} of {os.cpu_count()} cores (the idle ones)"})
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the parent shows progress; tqdm bars would only fill the stderr tail
        from natix.bench.plugins import load_plugins

        load_plugins(job["matrix"].get("plugins") or ())
        from natix.bench.group import run_group

        run_group(job, emit)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records the cell
        import traceback

        emit({"event": "error", "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        proto.close()
        os._exit(1)
    emit({"event": "done"})
    proto.close()
    os._exit(0)  # engines may leave non-daemon threads behind; the job is done


if __name__ == "__main__":
    main()
