"""sse-blueprint serving the benchmark events (gunicorn, gevent worker)."""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask

from benchmarks.common import pause, tick
from sse_blueprint import SSE, ProducerContext

sse = SSE()


def _wait_for_go(ctx: ProducerContext) -> None:
    go = ctx.input.get("go")
    while go and not os.path.exists(go):
        ctx.sleep(0.002)


@sse.producer("ticks")
def ticks(ctx: ProducerContext) -> dict[str, Any]:
    """``count`` tick events once the ``go`` file exists; paced by ``interval_ms`` or a burst
    that yields after each event (as a producer reading a model's token stream does)."""
    count, pad = int(ctx.input["count"]), "x" * int(ctx.input.get("pad", 0))
    interval = float(ctx.input.get("interval_ms", 0)) / 1000
    _wait_for_go(ctx)
    began = time.monotonic()
    for n in range(count):
        ctx.send("tick", tick(n, pad))
        ctx.sleep(pause(began, n, interval))
    return {"count": count}


@sse.producer("idle")
def idle(ctx: ProducerContext) -> None:
    ctx.sleep(3600)


@sse.producer("blocks")
def blocks(ctx: ProducerContext) -> dict[str, Any]:
    """``count`` one-delta blocks (persisted when ``persist``), then wait for ``go`` if given."""
    count, persist = int(ctx.input["count"]), bool(ctx.input.get("persist"))
    text = "A paragraph of a reply, long enough to look like one. " * 3
    for b in range(count):
        ctx.text(b, text)
        if persist:
            ctx.end_block(b)
        if b % 50 == 49:
            ctx.sleep(0.01)
    _wait_for_go(ctx)
    return {"count": count}


app = Flask(__name__)
app.config.update(
    SSE_MAX_CLIENTS_PER_STREAM=100_000,
    SSE_MAX_CLIENTS_PER_ADDRESS=100_000,
    SSE_MAX_STREAMS=100_000,
    SSE_MAX_STREAMS_PER_ADDRESS=100_000,  # every load client is on 127.0.0.1
    SSE_STREAM_TIMEOUT=3600,
)
app.config.from_prefixed_env()
sse.init_app(app)
