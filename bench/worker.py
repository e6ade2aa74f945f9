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
