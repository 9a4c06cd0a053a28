"""sse-starlette on uvicorn: one asyncio queue per client, the usual broadcast pattern (one stream
to many clients at ``/stream``; the chat shape at ``/chat/<k>``, no persistence)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.common import dumps, pause, tick

queues: set[asyncio.Queue[ServerSentEvent]] = set()


def follow(readers: set[asyncio.Queue[ServerSentEvent]]) -> EventSourceResponse:
    """A response fed by a queue of its own, one of ``readers`` while it is open."""
    queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
    readers.add(queue)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            while True:
                yield await queue.get()
        finally:
            readers.discard(queue)

    return EventSourceResponse(events(), ping=15, sep="\n")


async def stream(request: Request) -> EventSourceResponse:
    return follow(queues)


async def publish(request: Request) -> JSONResponse:
    count, pad = int(request.query_params["count"]), "x" * int(request.query_params.get("pad", 0))
    interval = float(request.query_params.get("interval_ms", 0)) / 1000

    async def run() -> None:
        began = time.monotonic()
        for n in range(count):
            event = ServerSentEvent(data=dumps(tick(n, pad)), event="tick", id=str(n + 1), sep="\n")
            for queue in list(queues):
                queue.put_nowait(event)
            await asyncio.sleep(pause(began, n, interval))

    asyncio.get_running_loop().create_task(run())
    return JSONResponse({"count": count})


#: The chat shape: one producer per channel, one queue per reader of it.
channels: dict[str, set[asyncio.Queue[ServerSentEvent]]] = {}


async def chat_stream(request: Request) -> EventSourceResponse:
    return follow(channels.setdefault(request.path_params["k"], set()))


async def publish_chat(request: Request) -> JSONResponse:
    q = request.query_params
    tokens, rate = int(q["tokens"]), float(q["rate"])

    async def chat(channel: str) -> None:
        readers = channels.setdefault(channel, set())
        began, interval = time.monotonic(), 1 / rate
        for n in range(tokens):
            data = {"t": time.time(), "n": n, "block": n // 80, "text": "tok "}
            event = ServerSentEvent(data=dumps(data), event="text_delta", id=str(n + 1), sep="\n")
            for queue in list(readers):
                queue.put_nowait(event)
            await asyncio.sleep(pause(began, n, interval))

    loop = asyncio.get_running_loop()
    tasks.update(loop.create_task(chat(str(k))) for k in range(int(q["streams"])))
    return JSONResponse({"streams": int(q["streams"])})


tasks: set[asyncio.Task[None]] = set()  # (held: the loop keeps only weak references)

app = Starlette(
    routes=[
        Route("/stream", stream),
        Route("/publish", publish, methods=["POST"]),
        Route("/chat/{k}", chat_stream),
        Route("/publish_chat", publish_chat, methods=["POST"]),
    ]
)
