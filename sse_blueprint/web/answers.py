"""What the views answer: a reader's stream in each format (SSE, NDJSON, the AI SDK's UI
message stream), refusals as JSON, a stream's status, and the helpers that find a stream and
call the store.

Imports the engine, the transport, the AI SDK translation and the wire module; not the views or
the extension.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

from flask import Response, current_app, request

from .. import _observe, _wire
from .._transport import DirectWriter, connection_shutter, encode, follow
from ..engine import Event, Stream, Unavailable
from ..storage.records import StreamRecord
from .aisdk import HEADERS as AI_SDK_HEADERS
from .aisdk import UIMessageStream
from .guard import RequestRefused
from .state import MULTIPROCESS_REFUSAL, AppState

if TYPE_CHECKING:
    from werkzeug.wrappers import Response as BaseResponse

log = logging.getLogger("sse_blueprint")

SSE_MIMETYPE = "text/event-stream"
NDJSON_MIMETYPE = "application/x-ndjson"
FORMAT_SSE, NDJSON, AI_SDK = "sse", "ndjson", "ai-sdk"
FORMATS = (FORMAT_SSE, NDJSON, AI_SDK)
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
EVENT_ID = re.compile(r"[0-9]{1,18}\Z")

P = ParamSpec("P")
T = TypeVar("T")


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> NoReturn:
    """Abort the request with a JSON error body (answered by :func:`refusal`)."""
    raise RequestRefused(status, message, headers)


def storage_unavailable() -> NoReturn:
    error(503, "stream storage is unavailable; retry shortly", {"Retry-After": "2"})


def answer(state: AppState, found: Stream | StreamRecord, last_id: int, fmt: str) -> Response:
    """The answer to a reader of ``found`` at ``last_id`` in format ``fmt``: ``sse``, ``ndjson``
    or ``ai-sdk`` (the AI SDK's UI message stream, always from the turn's start)."""
    ndjson = fmt == NDJSON
    config = state.config
    translate, cut_notice = None, b""
    if fmt == AI_SDK:
        ui = UIMessageStream(found.id if isinstance(found, Stream) else found.stream_id)
        preamble, translate, cut_notice = ui.start(), ui.encode, ui.interrupted()
    else:
        preamble = b"" if ndjson else state.retry
    if isinstance(found, Stream):
        terminal = found.terminal_event
        if terminal is not None and last_id >= terminal.id:
            return no_content(ndjson)  # tells EventSource to stop reconnecting
        if state.draining and state.backend is not None:
            # This worker is leaving and another can serve the stream: come back there.
            if translate is not None:  # the AI SDK does not reconnect by itself
                error(503, "this server is restarting; retry shortly", {"Retry-After": "1"})
            return stream_response(iter([preamble]), fmt)
        if found.subscriber_count >= config.max_clients_per_stream:
            error(429, "too many clients on this stream", {"Retry-After": "5"})
        address = request.remote_addr or ""
        if state.clients_by_address.get(address, 0) >= config.max_clients_per_address:
            error(429, "too many open streams from your address", {"Retry-After": "5"})
        release = None  # frees this response's place in the count across workers (Redis)
        if state.backend is not None:
            place = state.backend.claim_client(address, config.max_clients_per_address)
            if place is None:
                error(429, "too many open streams from your address", {"Retry-After": "5"})
            if place:
                release = partial(state.backend.release_client, place)
        closer = connection_shutter(request.environ)
        direct = DirectWriter.for_request(request.environ, ndjson, config.direct_writes)
        sub = found.subscribe(last_id, on_cut=closer)
        first: list[Event] = []
        if sub.from_store:
            # Read the store now, not in the body: if it is down, the answer is a 503 that
            # the client retries, not a 200 that ends with nothing in it.
            first = sub.poll(0)
            if sub.cut and not first:
                sub.close()
                if release is not None:
                    release()
                storage_unavailable()
        if closer is not None:
            state.write_watch.add(sub)
        body: Iterator[bytes] = follow(
            sub,
            config.heartbeat_interval,
            preamble,
            _wire.NDJSON_KEEPALIVE if ndjson else _wire.HEARTBEAT,
            ndjson,
            watch=state.write_watch,
            counts=state.clients_by_address,
            address=address,
            direct=direct,
            release=release,
            first=first,
            translate=translate,
            cut_notice=cut_notice,
            hold=state.held.take_over if direct is not None and config.hold_idle else None,
        )
    else:  # only in the store: it has ended
        if found.terminal_id is not None and last_id >= found.terminal_id:
            return no_content(ndjson)
        events = store_call(state.registry.replay, found, last_id)
        data = preamble + translate(events) if translate else encode(events, ndjson, preamble)
        body = iter([data])
    return stream_response(body, fmt)


def no_content(ndjson: bool) -> Response:
    """A ``204``: the client holds the stream's end. EventSource stops reconnecting on it.

    It carries the type the client asked for: a client library that checks the type of every
    answer (``httpx-sse`` raises on anything but ``text/event-stream``) then reads an empty
    stream instead of failing.
    """
    return Response(status=204, content_type=NDJSON_MIMETYPE if ndjson else SSE_MIMETYPE)


def refusal(exc: RequestRefused) -> Response:
    """The JSON answer to a refused request; shuts the connection after it if asked."""
    response = current_app.response_class(
        json.dumps({"error": exc.message}) + "\n", status=exc.status, mimetype="application/json"
    )
    response.headers.update(exc.headers)
    shut = connection_shutter(request.environ) if exc.close else None
    if shut is not None:
        response.call_on_close(shut)
    return response


def refuse_multiprocess(state: AppState) -> Response:
    """This process is one of several (``wsgi.multiprocess``) and has no shared backend.

    Each process would run its streams alone: a reader served by another process would find
    the stream "running" in the database with no producer there, and end it as lost while it
    still runs. Refuse everything instead, loudly.
    """
    if not state.warned_multiprocess:
        state.warned_multiprocess = True
        log.error("%s", MULTIPROCESS_REFUSAL)
    return refusal(RequestRefused(500, MULTIPROCESS_REFUSAL))


def stream_response(body: Iterator[bytes], fmt: str) -> Response:
    mimetype = NDJSON_MIMETYPE if fmt == NDJSON else SSE_MIMETYPE
    response = Response(body, status=200, content_type=mimetype)
    if fmt == AI_SDK:
        response.headers.update(AI_SDK_HEADERS)
    # The body is bytes already: the server iterates it directly (no per-chunk wrappers), and
    # closes it, which runs its ``finally``.
    response.direct_passthrough = True
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def find(state: AppState, stream_id: str) -> Stream | StreamRecord:
    if not STREAM_ID.match(stream_id):
        error(404, "stream not found")
    _observe.current_stream.set(stream_id)  # for the log lines of this request
    found = store_call(state.streams.find, stream_id)
    if found is None:
        error(404, "stream not found")
    return found


def store_call(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call something that may read the store; an unreachable store is a 503, not a 500."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        log_unavailable("stream storage or backend unavailable", exc)
        storage_unavailable()


def log_unavailable(what: str, exc: Exception) -> None:
    """An outage (database, Redis) is a warning; anything else is a bug and gets a traceback."""
    if is_outage(exc):
        log.warning("%s: %s", what, exc)
    else:
        log.exception(what)


def is_outage(exc: BaseException) -> bool:
    """The store or the backend is away (they say so with :class:`Unavailable`)."""
    return isinstance(exc, Unavailable | OSError)


def last_event_id() -> int:
    """The client's position: ``Last-Event-ID`` header, else ``last_event_id`` query parameter.

    The header wins: a page passes the id it stored in the query string of the URL it opens, and
    EventSource then reconnects to that same URL with the newer id in the header.
    """
    raw = request.headers.get("Last-Event-ID", "")
    if raw.strip() == "":
        raw = request.args.get("last_event_id", "")
    raw = raw.strip()
    if raw == "":
        return 0
    if not EVENT_ID.match(raw):
        error(400, "Last-Event-ID must be a non-negative integer event id of this stream")
    return int(raw)


def response_format() -> str:
    """``?format=`` (``sse``, ``ndjson``, ``ai-sdk``), else what ``Accept`` prefers."""
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            error(400, 'format must be "sse", "ndjson" or "ai-sdk"')
        return fmt
    best = request.accept_mimetypes.best_match([SSE_MIMETYPE, NDJSON_MIMETYPE])
    return NDJSON if best == NDJSON_MIMETYPE else FORMAT_SSE


def add_cors_headers(response: BaseResponse, allowed: tuple[str, ...]) -> None:
    origin = request.headers.get("Origin")
    if not allowed or not origin:
        return
    response.vary.add("Origin")
    if "*" in allowed:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin.rstrip("/") in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
    else:
        return
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Last-Event-ID"
        response.headers["Access-Control-Max-Age"] = "600"
