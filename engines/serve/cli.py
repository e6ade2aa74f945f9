"""``natix-serve``: load an engine and serve it over OpenAI's HTTP API.

    natix-serve --model smollm2-135m --adapter bench/data/adapters/smollm2-chain-sum-lora
    natix-serve --model fp8/ --engine vllm --python .venvs/vllm/bin/python --port 8001
    natix-serve --model qoq/ --engine natix --set KEY=VALUE   # capacity keys into cfg.extra

An engine that implements the streaming interface (natix) is driven directly: requests join its
continuous batch. Any other (hf, vllm, an engine in a worker under ``--python``) runs behind
:class:`~natix.engines.serve.adapter.BatchingAdapter`, whose window (``--batch-window-ms``)
groups requests that arrive together into one ``generate`` call.

Shutdown: the first SIGTERM (or Ctrl-C) starts a drain: new requests get ``503``, ``/health``
turns ``503``, requests in flight finish (up to ``--drain-timeout``), then the server exits 0.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from typing import Any

import click

__all__ = ["main", "load_engine"]

log = logging.getLogger("natix.serve")


def _extra(values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for ``EngineConfig.extra``; values parse as YAML scalars (ints, floats,
    booleans), else stay strings."""
    import yaml

    out: dict[str, Any] = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_engine(engine: str, cfg: Any, *, python: str | None = None, window_s: float = 0.005,
                max_model_len: int | None = None) -> tuple[Any, Any, Any, int]:
    """Load ``engine`` (in a worker under ``python`` if given) and return ``(streaming engine,
    tokenizer, the loaded engine, context length)``; batch-only engines come wrapped in a
    :class:`~natix.engines.serve.adapter.BatchingAdapter`."""
    from natix.engines.base import create_engine
    from natix.engines.serve.adapter import BatchingAdapter
    from natix.engines.streaming import StreamingEngine

    if python:
        from natix.engines.worker import RemoteEngine

        loaded: Any = RemoteEngine(python=python, engine=engine)
    else:
        loaded = create_engine(engine)
    loaded.load(cfg)
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        from natix.quant.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    if isinstance(loaded, StreamingEngine):
        streaming = loaded
    else:
        streaming = BatchingAdapter(loaded, window_s=window_s, max_batch_rows=cfg.max_batch_size, tokenizer=tokenizer)
    return streaming, tokenizer, loaded, max_model_len or _context_length(loaded, tokenizer)


def _context_length(engine: Any, tokenizer: Any) -> int:
    for value in (getattr(engine, "max_model_len", None),
                  getattr(getattr(getattr(engine, "model", None), "config", None), "max_position_embeddings", None),
                  getattr(tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10**7:
            return value
    log.warning("cannot tell the model's context length; assuming 2048 (set --max-model-len)")
    return 2048


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _setup_logging(level: str, access_log: bool) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    acc = logging.getLogger("natix.serve.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the line is JSON already
    acc.handlers = [handler]
    acc.propagate = False
    acc.disabled = not access_log


def _draining_server(config: Any, state: Any, drain_timeout: float) -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGTERM/SIGINT drains instead of closing the listener: new
        requests are answered 503 while the ones in flight finish."""

        drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_deadline is not None:  # second signal: uvicorn's own (fast) exit
                super().handle_exit(sig, frame)
                return
            self.drain_deadline = time.monotonic() + drain_timeout
            state.draining = True
            log.info("%s: draining %d request(s) in flight (up to %g s)", signal.Signals(sig).name,
                     state.in_flight, drain_timeout)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                if state.in_flight == 0:
                    log.info("drained; exiting")
                    self.should_exit = True
                elif time.monotonic() > self.drain_deadline:
                    log.warning("drain timeout: %d request(s) still in flight", state.in_flight)
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Model directory, .gguf, natix artifact or embedded name (smollm2-135m).")
@click.option("--adapter", help="PEFT adapter directory, merged on load.")
@click.option("--engine", default="hf", show_default=True, help="Engine: hf, vllm, natix (any registered engine).")
@click.option("--python", help="Run the engine in a worker under this interpreter (e.g. .venvs/vllm/bin/python).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--set", "extra", multiple=True, help="KEY=VALUE into the engine's config extra; repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="0 picks a free port (printed at start).")
@click.option("--api-key", envvar="NATIX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and /tokenize "
              "(env NATIX_API_KEY).")
@click.option("--served-model-name", help="The model id clients send (default: the model's folder name).")
@click.option("--max-batch-size", default=64, show_default=True, type=int,
              help="Requests the engine runs at once (and samples per generate call behind the adapter).")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests that may wait beyond the running ones; past it 429 with Retry-After.")
@click.option("--batch-window-ms", default=5.0, show_default=True, type=float,
              help="Batching window for engines without a streaming interface (hf, vllm).")
@click.option("--max-model-len", type=int, help="Context length (default: the model's).")
@click.option("--max-tokens-limit", default=4096, show_default=True, type=int, help="Largest max_tokens accepted.")
@click.option("--max-n", default=16, show_default=True, type=int, help="Largest n (and test-time budget) accepted.")
@click.option("--request-timeout", default=600.0, show_default=True, type=float, help="Seconds before a request is aborted (504).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float, help="Seconds to let requests finish on SIGTERM.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="One JSON line per request on stderr.")
def main(model: str, adapter: str | None, engine: str, python: str | None, device: str, dtype: str,
         extra: tuple[str, ...], host: str, port: int, api_key: str | None, served_model_name: str | None,
         max_batch_size: int, max_queue: int, batch_window_ms: float, max_model_len: int | None,
         max_tokens_limit: int, max_n: int, request_timeout: float, drain_timeout: float, log_level: str,
         access_log: bool) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), with
    /tokenize, /health, /metrics and the "natix" test-time-compute extension."""
    from pathlib import Path

    import uvicorn

    from natix.engines.base import EngineConfig
    from natix.engines.serve.app import ServerConfig, build_app

    _setup_logging(log_level, access_log)
    for name, value in (("--max-batch-size", max_batch_size), ("--max-n", max_n), ("--max-tokens-limit", max_tokens_limit)):
        if value < 1:
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=name)
    if max_queue < 0:
        raise click.BadParameter(f"must be >= 0, got {max_queue}", param_hint="--max-queue")
    cfg = EngineConfig(model=model, adapter=adapter, device=device, dtype=dtype, max_batch_size=max_batch_size,
                       extra=_extra(extra))
    try:
        sock = _bind(host, port)  # before the slow load: a taken port fails at once
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}") from e
    t0 = time.perf_counter()
    try:
        streaming, tokenizer, loaded, ctx = load_engine(engine, cfg, python=python, window_s=batch_window_ms / 1e3,
                                                        max_model_len=max_model_len)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(f"cannot load {engine} engine for {model}: {e}") from e
    name = served_model_name or Path(model.rstrip("/")).name
    server_cfg = ServerConfig(model_name=name, max_model_len=ctx, max_tokens_limit=max_tokens_limit, max_n=max_n,
                              max_running=max_batch_size, max_queue=max_queue, request_timeout_s=request_timeout,
                              api_key=api_key or None, engine=engine)
    app = build_app(streaming, tokenizer, server_cfg, on_close=loaded.close)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(drain_timeout) + 1)
    server = _draining_server(config, app.state.natix, drain_timeout)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("%s engine loaded in %.1f s; serving %r (context %d)", engine, time.perf_counter() - t0, name, ctx)
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"natix-serve: listening on http://{url_host}:{bound_port}", err=True)
    server.run(sockets=[sock])


if __name__ == "__main__":  # pragma: no cover
    main()
