"""Encoding cost per event (pytest-benchmark): the same tick event, ours and the peers'.

Not part of ``make test``; ``benchmarks.run`` runs it with ``--benchmark-json``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import dumps, tick
from sse_blueprint.engine import Event

DATA = tick(41, "x" * 64)


def test_sse_blueprint_event(benchmark: Any) -> None:
    """JSON plus SSE bytes, made once per event and shared by every subscriber."""
    out = benchmark(lambda: Event(42, "tick", DATA).sse)
    assert out.startswith(b"id: 42\nevent: tick\ndata: {")


def test_sse_starlette_event(benchmark: Any) -> None:
    """sse-starlette encodes per client (each response encodes the events it sends)."""
    from sse_starlette.sse import ServerSentEvent

    out = benchmark(lambda: ServerSentEvent(data=dumps(DATA), event="tick", id="42").encode())
    assert b"event: tick" in out


def test_flask_sse_message(benchmark: Any) -> None:
    """Flask-SSE: JSON to Redis, then per client ``json.loads`` and ``str(Message)``."""
    import json

    from flask_sse import Message

    def encode() -> bytes:
        stored = json.dumps(Message(DATA, type="tick", id=42).to_dict())
        return str(Message(**json.loads(stored))).encode()

    out = benchmark(encode)
    assert out.startswith(b"event:tick")
