"""natix-serve: an OpenAI-compatible HTTP server over any engine, with test-time compute built in.

Layers, one file each: ``protocol`` (the request models and the OpenAI error body),
``adapter`` (a :class:`~natix.engines.streaming.StreamingEngine` over any batch
``Engine.generate``, with a batching window), ``loop`` (the thread that steps the engine and
hands deltas to the requests waiting for them), ``metrics`` (Prometheus), ``voting`` (the
``"natix"`` extension field: maj@N, best-of-N, adaptive in the same call), ``app`` (FastAPI
routes) and ``cli`` (``natix-serve``).

Importing this package is light: FastAPI, uvicorn and torch are imported by the modules that
use them, when they are used.
"""
