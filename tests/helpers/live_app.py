"""The reference app plus producers that only tests need (served by gunicorn in the tests)."""

from __future__ import annotations

from typing import Any

from flask import request

from app import create_app, sse
from sse_blueprint import ProducerContext, ProducerError


@sse.producer("flood")
def flood(ctx: ProducerContext) -> dict[str, Any]:
    """``count`` deltas of ``size`` characters, one every ``interval_ms``: fills socket buffers."""
    count, size = int(ctx.input.get("count", 100)), int(ctx.input.get("size", 1000))
    interval = int(ctx.input.get("interval_ms", 0)) / 1000
    ctx.set_metadata(count=count, size=size)
    for i in range(count):
        ctx.text(0, chr(ord("a") + i % 26) * size)
        ctx.sleep(interval)
    return {"count": count}


@sse.producer("fail")
def fail(ctx: ProducerContext) -> None:
    ctx.text(0, "partial")
    if ctx.input.get("visible"):
        raise ProducerError("the model refused")
    raise RuntimeError("deliberate test failure: secret internal detail")


@sse.producer("stall", timeout=0.3)
def stall(ctx: ProducerContext) -> None:
    """Sends one delta, then waits forever: ended by its 0.3 s timeout."""
    ctx.text(0, "waiting")
    ctx.sleep(3600)


@sse.producer("named")
def named(ctx: ProducerContext) -> dict[str, Any]:
    """Sends ``events`` ([name, data] pairs) one every ``interval_ms``, then ``text`` in block 0."""
    interval = int(ctx.input.get("interval_ms", 0)) / 1000
    for name, data in ctx.input.get("events", []):
        ctx.send(name, data)
        ctx.sleep(interval)
    ctx.text(0, str(ctx.input.get("text", "")))
    return {}


app = create_app()


@app.get("/test/active")
def active() -> dict[str, bool]:
    return sse.active(request.args.getlist("id"))


@app.get("/test/resources")
def resources() -> dict[str, Any]:
    """What a leak would grow: descriptors, live greenlets, readers, DB and Redis connections."""
    import gc
    import os

    import greenlet  # type: ignore[import-untyped]

    from sse_blueprint.web.state import app_state as _state

    state = _state()
    store: Any = state.store
    gc.collect()
    streams = list(state.registry)
    backend: Any = state.backend  # the Redis backend's own parts, beyond the port
    mirrors = list(backend.mirrors.values()) if backend is not None else []
    pool: Any = backend.redis.connection_pool if backend is not None else None
    pool_ = store.engine.pool
    pooled = hasattr(pool_, "checkedout")  # SQLite files use NullPool: nothing held
    checked_out = pool_.checkedout() if pooled else 0
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "greenlets": sum(
            1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead
        ),
        "readers": sum(s.subscriber_count for s in streams + mirrors),
        "parked": sum(len(s.readers.fan_out.parked) for s in streams + mirrors),
        "held": len(state.held),
        "running": state.registry.running,
        "db_checked_out": checked_out,
        "db_open": checked_out + (pool_.checkedin() if pooled else 0),
        "redis_connections": len(pool._connections) if pool is not None else 0,
        "clients_by_address": sum(state.clients_by_address.values()),
        "gc_threshold": list(gc.get_threshold()),
    }
