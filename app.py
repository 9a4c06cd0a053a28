"""Reference app: the sse_blueprint extension mounted at ``/api`` with the ``demo`` producer.

Serve it with ``make run`` (gunicorn, gevent worker, ``gunicorn.conf.py``). Every ``SSE_*`` key
can be set from the environment as ``FLASK_SSE_*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Flask

from sse_blueprint import SSE, InputError, ProducerContext

sse = SSE()

#: A block ends after a blank line: the run of newlines stays with the block before it.
_BLOCK_BOUNDARY = re.compile(r"(?<=\n\n)(?=[^\n])")
MAX_DEMO_TEXT = 1_000_000


def split_blocks(text: str) -> list[str]:
    """Split ``text`` into blocks at blank lines; ``"".join(split_blocks(t)) == t``."""
    return [block for block in _BLOCK_BOUNDARY.split(text) if block]


def _int_field(input: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = input.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f'"{key}" must be an integer from {low} to {high}')
    return value


def validate_demo(input: Mapping[str, Any]) -> dict[str, Any]:
    """Check the demo's input: ``text`` (str), ``chunk_size`` and ``interval_ms`` (ints)."""
    text = input.get("text", "")
    if not isinstance(text, str):
        raise InputError('"text" must be a string')
    if len(text) > MAX_DEMO_TEXT:
        raise InputError(f'"text" must be at most {MAX_DEMO_TEXT} characters')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError('"text" must be valid Unicode (no lone surrogates)') from None
    return {
        "text": text,
        "chunk_size": _int_field(input, "chunk_size", 8, 1, 1_000_000),
        "interval_ms": _int_field(input, "interval_ms", 30, 0, 60_000),
    }


@sse.producer("demo", validate=validate_demo)
def demo(ctx: ProducerContext) -> dict[str, Any]:
    """A stand-in for an LLM: stream ``text`` block by block as ``text_delta`` events."""
    text: str = ctx.input["text"]
    size: int = ctx.input["chunk_size"]
    interval = ctx.input["interval_ms"] / 1000
    blocks = split_blocks(text)
    sent = 0
    for index, block in enumerate(blocks):
        for start in range(0, len(block), size):
            ctx.text(index, block[start : start + size])
            sent += 1
            if interval:
                ctx.sleep(interval)
            elif sent % 64 == 0:
                gevent.sleep(0)  # let readers run during a long burst
        ctx.end_block(index)
    return {"blocks": len(blocks), "characters": len(text)}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the reference app; ``config`` overrides the environment (``FLASK_*``)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_prefixed_env()
    if config:
        app.config.update(config)
    sse.init_app(app, url_prefix="/api")

    @app.get("/")
    def index() -> dict[str, Any]:
        return {
            "name": "sse-blueprint reference app",
            "producers": list(sse.producers),
            "create": "POST /api/streams",
        }

    return app


app = create_app()
