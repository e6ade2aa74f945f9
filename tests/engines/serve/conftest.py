"""natix-serve processes for the server tests: real ``natix-serve`` subprocesses on loopback.

A server starts once per session (tiny random Llama; the SmolLM2 one in its own module) on a
free port (``--port 0``, read back from its "listening on" line), and is stopped with SIGTERM.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

API_KEY = "test-key-123"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    api_key: str | None = None
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def tail(self) -> str:
        return "".join(self.log)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(args: list[str], timeout: float = 120.0) -> Server:
    """Start ``natix-serve ARGS --port 0`` and wait until it listens (and answers /health).
    Used by the test modules through the ``serve_starter`` fixture (conftest modules are not
    importable under --import-mode=importlib)."""
    import httpx

    env = dict(os.environ, PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "natix.engines.serve.cli", *args, "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    server = Server(proc, api_key=args[args.index("--api-key") + 1] if "--api-key" in args else None)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log.append(line)
            if "listening on http://" in line and not server.url:
                server.url = line.rsplit(" ", 1)[-1].strip()
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not server.url:
        server.stop()
        raise RuntimeError(f"natix-serve did not start:\n{server.tail()}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"natix-serve never became healthy:\n{server.tail()}")


@pytest.fixture(scope="session")
def serve_starter():
    return start_server


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """The tiny model behind the batching adapter, with an API key and small limits (4 running +
    4 queued requests, n <= 8, max_tokens <= 256, 20 s request timeout) so overload is cheap."""
    server = start_server(["--model", tiny_model_dir, "--device", "cpu", "--api-key", API_KEY,
                           "--served-model-name", "tiny", "--max-batch-size", "4", "--max-queue", "4",
                           "--max-n", "8", "--max-tokens-limit", "256", "--request-timeout", "20",
                           "--batch-window-ms", "20"])
    yield server
    code = server.stop()
    assert code == 0, f"natix-serve exited with {code}:\n{server.tail()}"
