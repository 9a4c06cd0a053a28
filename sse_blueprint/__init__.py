"""sse-blueprint: resumable Server-Sent Events for Flask, served by gevent.

A producer (an LLM writing a reply, a long job) runs on its own greenlet; its events fan out to
any number of ``EventSource`` clients, and a client that reconnects with ``Last-Event-ID``
catches up exactly: no gap, no duplicate.

    from flask import Flask
    from sse_blueprint import SSE

    sse = SSE()

    @sse.producer("hello")
    def hello(ctx):
        with ctx.block("reasoning") as thinking:     # typed blocks: text, reasoning,
            thinking.write("A greeting, then.")      # tool_call, tool_result, your own
        with ctx.block("text") as answer:
            for word in ["Hello", ", ", "world"]:
                answer.write(word)
                ctx.sleep(0.1)
        ctx.send("usage", {"output_tokens": 3})     # durable: replayed on resume

    app = Flask(__name__)
    sse.init_app(app)   # POST /api/streams, GET /api/streams/<id>, .../status, .../cancel
"""

from __future__ import annotations

from ._config import ConfigError
from .engine import (
    Block,
    Producer,
    ProducerContext,
    ProducerError,
    ShuttingDown,
    Stream,
    StreamClosed,
    StreamLimitReached,
    StreamState,
)
from .storage.records import BlockStore
from .storage.schema import create_all, metadata
from .storage.sql import SQLStore, run_blocking
from .web import SSE, InputError, shutdown

# What an app types. The engine's and the storage's other types are in ``sse_blueprint.engine``
# (Event, Subscription, StreamRegistry, ...) and ``sse_blueprint.storage`` (the records a
# BlockStore of your own reads and writes).
__all__ = [
    "SSE",
    "Block",
    "BlockStore",
    "ConfigError",
    "InputError",
    "Producer",
    "ProducerContext",
    "ProducerError",
    "SQLStore",
    "ShuttingDown",
    "Stream",
    "StreamClosed",
    "StreamLimitReached",
    "StreamState",
    "create_all",
    "metadata",
    "run_blocking",
    "shutdown",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """The client lives in ``sse_blueprint.client`` (needs the ``client`` extra: httpx)."""
    if name in ("StreamClient", "StreamReader", "CircuitBreaker"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'sse_blueprint' has no attribute {name!r}")
