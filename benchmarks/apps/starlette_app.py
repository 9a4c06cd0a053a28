"""sse-starlette on uvicorn: one asyncio queue per client, the usual broadcast pattern."""

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


async def stream(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
    queues.add(queue)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            while True:
                yield await queue.get()
        finally:
            queues.discard(queue)

    return EventSourceResponse(events(), ping=15, sep="\n")


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


app = Starlette(routes=[Route("/stream", stream), Route("/publish", publish, methods=["POST"])])
