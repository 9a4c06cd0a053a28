"""sse-blueprint serving the benchmark events (gunicorn, gevent worker)."""

from __future__ import annotations

import collections
import datetime
import gc
import os
import time
from typing import Any

import gevent
import gevent.event
from flask import Flask, request
from sqlalchemy import Engine, event, text

from benchmarks.common import pause, tick
from sse_blueprint import SSE, ProducerContext, SQLStore

sse = SSE()


#: One watcher per go file: thousands of producers waiting for it must not each poll the disk
#: (2,000 streams polling every 2 ms saturate the worker before the benchmark starts).
_GO: dict[str, gevent.event.Event] = {}


def _watch(path: str, event: gevent.event.Event) -> None:
    while not os.path.exists(path):
        gevent.sleep(0.002)
    event.set()


def _wait_for_go(ctx: ProducerContext) -> None:
    go = ctx.input.get("go")
    if not go:
        return
    event = _GO.get(go)
    if event is None:
        event = _GO[go] = gevent.event.Event()
        gevent.spawn(_watch, go, event)
    while not event.wait(1):
        ctx.sleep(0)  # (raises StreamClosed if the stream was cancelled meanwhile)


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


@sse.producer("chat")
def chat(ctx: ProducerContext) -> dict[str, Any]:
    """The chat shape: ``tokens`` text deltas at ``rate`` per second once ``go`` exists, in
    blocks of ``block_tokens``, with a tool call (streamed arguments) and its result after every
    ``tool_every`` blocks. Text deltas carry ``t`` and ``n`` for the load client."""
    tokens, rate = int(ctx.input.get("tokens", 300)), float(ctx.input.get("rate", 30))
    per_block, tool_every = (
        int(ctx.input.get("block_tokens", 80)),
        int(ctx.input.get("tool_every", 3)),
    )
    _wait_for_go(ctx)
    began, interval = time.monotonic(), 1 / rate
    block, in_block, blocks = ctx.block(), 0, 0
    for n in range(tokens):
        ctx.send("text_delta", {"t": time.time(), "n": n, "block": block.index, "text": "tok "})
        in_block += 1
        if in_block == per_block or n == tokens - 1:
            block.end()
            blocks += 1
            ENDED[0] += 1
            if blocks % tool_every == 0:
                call = ctx.block("tool_call", {"name": "search", "call_id": f"c{blocks}"})
                for part in ('{"query": ', '"weather"', "}"):
                    call.write(part)
                call.end({"input": {"query": "weather"}})
                with ctx.block("tool_result", {"call_id": f"c{blocks}"}) as result:
                    result.write('{"temp_c": 21}')
                ENDED[0] += 2
            if n < tokens - 1:
                block, in_block = ctx.block(), 0
        ctx.sleep(pause(began, n, interval))
    return {"tokens": tokens, "blocks": blocks}


#: The size of each database statement (its SQL and parameters) sent, for the chat shape's
#: per-token figures. (list.append is atomic: SQLite's statements run on threadpool threads.)
STATEMENTS: list[int] = []
#: Blocks the chat producers have ended (each must become a complete row).
ENDED = [0]
STARTED = datetime.datetime.now(datetime.UTC)


@event.listens_for(Engine, "before_cursor_execute")
def _count(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    STATEMENTS.append(len(statement) + len(repr(parameters)))


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


@app.get("/bench/db")
def db_counts() -> dict[str, int]:
    sizes = list(STATEMENTS)
    return {"statements": len(sizes), "bytes": sum(sizes)}


#: Seconds spent in garbage collection, per generation (gc.callbacks).
GC_SECONDS = [0.0, 0.0, 0.0]
_gc_began = [0.0]


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_began[0] = time.perf_counter()
    else:
        GC_SECONDS[info["generation"]] += time.perf_counter() - _gc_began[0]


gc.callbacks.append(_gc_timer)


@app.get("/bench/gc")
def gc_figures() -> dict[str, Any]:
    figures = {"seconds": GC_SECONDS, "stats": gc.get_stats(), "threshold": gc.get_threshold()}
    if request.args.get("census"):  # what the collector tracks, by type (slow: a diagnosis)
        census = collections.Counter(type(o).__name__ for o in gc.get_objects())
        figures["tracked"] = sum(census.values())
        figures["census"] = dict(census.most_common(25))
    return figures


@app.get("/bench/persisted")
def persisted() -> dict[str, int]:
    """Blocks ended so far, and how many are complete rows in the database (this server's: a
    PostgreSQL database is shared by the runs)."""
    store = app.extensions["sse_blueprint"].store
    assert isinstance(store, SQLStore)
    query = "SELECT count(*) FROM sse_turn_blocks WHERE complete AND created_at >= :since"
    with store.engine.connect() as conn:
        stored = conn.execute(text(query), {"since": STARTED}).scalar()
    return {"ended": ENDED[0], "stored": int(stored or 0)}


@app.get("/bench/memory")
def memory() -> dict[str, Any]:
    """A diagnosis (run with PYTHONTRACEMALLOC=25): where the live Python memory was allocated."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        return {}
    snapshot = tracemalloc.take_snapshot()
    group = request.args.get("by", "lineno")
    stats = snapshot.statistics(group)[: int(request.args.get("top", 40))]
    return {"top": [[str(s.traceback), s.size, s.count] for s in stats]}
