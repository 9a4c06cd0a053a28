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


app = create_app()


@app.get("/test/active")
def active() -> dict[str, bool]:
    return sse.active(request.args.getlist("id"))
