"""The blueprint's views: thin, on top of :mod:`.answers` (a reader's answer, refusals) and
:mod:`.service` (streams wherever they live).

Endpoints (relative to the blueprint's prefix, ``/api`` by default):

* ``POST /streams`` starts a producer: ``201 {"stream_id", "stream_url"}``.
* ``GET /streams/<id>`` follows a stream as SSE (or NDJSON), resuming after ``Last-Event-ID``;
  ``?format=ai-sdk`` answers the Vercel AI SDK's UI message stream instead (see ``aisdk``).
* ``GET /streams/<id>/status`` reports its state; ``POST /streams/<id>/cancel`` cancels it.
* ``GET /client.js``: the browser client.

Bad input never produces a 5xx: every refusal is a 4xx with a JSON body ``{"error": "..."}``.
Imports the answers, the state and the request guard; not the extension.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from flask import Blueprint, Response, current_app, request, send_file, url_for
from werkzeug.exceptions import HTTPException

from .. import _observe
from ..engine import ShuttingDown, Stream, StreamLimitReached
from .answers import (
    AI_SDK,
    add_cors_headers,
    answer,
    error,
    find,
    last_event_id,
    log_unavailable,
    refusal,
    refuse_multiprocess,
    response_format,
    store_call,
)
from .guard import REFUSAL_SUFFIX, RequestRefused, check_post, read_json_body, routing_refusal
from .state import EXTENSION_KEY, app_state

if TYPE_CHECKING:
    from werkzeug.wrappers import Response as BaseResponse

__all__ = ["CLIENT_JS", "CLIENT_VERSION", "make_blueprint"]

#: The browser client, served at ``<prefix>/client.js``.
CLIENT_JS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "js", "index.js")
CLIENT_VERSION = "0.1.0"  # the npm package's version (js/package.json)
_ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def make_blueprint() -> Blueprint:
    bp = Blueprint("sse", __name__)

    def route(rule: str, methods: list[str]) -> Callable[[Callable[..., Any]], Any]:
        """Register a view, and JSON 405s for the other methods on the same rule."""

        def decorator(view: Callable[..., Any]) -> Any:
            bp.add_url_rule(rule, view_func=view, methods=methods, merge_slashes=False)
            others = sorted(_ALL_METHODS - set(methods) - ({"HEAD"} if "GET" in methods else set()))
            allowed = ", ".join(methods)

            def not_allowed(**_: Any) -> NoReturn:
                error(405, f"method not allowed; use {allowed}", {"Allow": allowed})

            bp.add_url_rule(
                rule,
                endpoint=f"{view.__name__}_method{REFUSAL_SUFFIX}",
                view_func=not_allowed,
                methods=others,
                provide_automatic_options=False,
                merge_slashes=False,
            )
            return view

        return decorator

    @route("/streams", ["POST"])
    def create_stream() -> tuple[dict[str, Any], int, dict[str, str]]:
        state = app_state()
        if state.draining:
            error(503, "the server is shutting down; retry", {"Retry-After": "1"})
        config = state.config
        check_post(request, config.cors_origins)
        address = request.remote_addr or ""
        if state.streams_by_address.get(address, 0) >= config.max_streams_per_address:
            error(429, "too many running streams from your address", {"Retry-After": "5"})
        body = read_json_body(request, config.max_request_bytes, config.body_timeout)
        name = body.get("producer")
        if not isinstance(name, str) or not name:
            error(400, '"producer" must be a non-empty string')
        input = body.get("input", {})
        if not isinstance(input, dict):
            error(400, '"input" must be a JSON object')
        ext = state.ext
        if name not in ext.producers:
            error(400, f"unknown producer {name!r}")
        metadata = ext.access.metadata_for(name, input)
        ext.access.check("create", metadata)
        # Counted before it starts, counted down once when it ends (which may be before
        # ext.start returns: a producer that fails at once, a backend that refuses the claim)
        # or when it never starts.
        counts = state.streams_by_address
        counts[address] = counts.get(address, 0) + 1
        ended = False

        def finished(_: Stream | None = None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                if counts.get(address, 0) > 1:
                    counts[address] -= 1
                else:
                    counts.pop(address, None)

        try:
            stream = ext.start(name, input, metadata=metadata, on_complete=finished)
        except BaseException as exc:
            finished()
            if isinstance(exc, ValueError):  # InputError
                error(400, str(exc))
            if isinstance(exc, ShuttingDown):
                error(503, "the server is shutting down; retry", {"Retry-After": "1"})
            if isinstance(exc, StreamLimitReached):
                error(503, f"too many streams: {exc}", {"Retry-After": "5"})
            if not isinstance(exc, Exception):
                raise
            log_unavailable("could not start a stream", exc)
            error(503, "the stream backend is unavailable; retry shortly", {"Retry-After": "2"})
        url = url_for(".read_stream", stream_id=stream.id)
        return {"stream_id": stream.id, "stream_url": url}, 201, {"Location": url}

    @route("/streams/<stream_id>", ["GET"])
    def read_stream(stream_id: str) -> BaseResponse:
        state = app_state()
        found = find(state, stream_id)
        state.ext.access.check("read", found.metadata)
        fmt = response_format()
        # The AI SDK reads every answer from the turn's start (its resume replaces the message).
        return answer(state, found, 0 if fmt == AI_SDK else last_event_id(), fmt)

    @route("/streams/<stream_id>/status", ["GET"])
    def stream_status(stream_id: str) -> dict[str, Any]:
        state = app_state()
        found = find(state, stream_id)
        state.ext.access.check("status", found.metadata)
        return store_call(state.streams.status, found).to_json()

    @route("/streams/<stream_id>/cancel", ["POST"])
    def cancel_stream(stream_id: str) -> tuple[dict[str, Any], int]:
        state = app_state()
        check_post(request, state.config.cors_origins)
        found = find(state, stream_id)
        state.ext.access.check("cancel", found.metadata)
        status, ended = store_call(state.streams.cancel, found)
        return status.to_json(), 202 if ended else 200

    @route("/metrics", ["GET"])
    def metrics() -> BaseResponse:
        state = app_state()
        if not state.config.metrics:
            error(404, "metrics are off (set SSE_METRICS = true)")
        state.ext.access.check("metrics", {})
        body, content_type = _observe.render_metrics()
        return current_app.response_class(body, content_type=content_type)

    @route("/client.js", ["GET"])
    def client_js() -> BaseResponse:
        """The browser client (``sse_blueprint/js/index.js``). ``?v=<version>`` (what
        :meth:`SSE.client_url` gives) is cached for a year; without it, revalidated (ETag)."""
        pinned = request.args.get("v") == CLIENT_VERSION
        response = send_file(
            CLIENT_JS, mimetype="text/javascript", etag=True, conditional=True,
            max_age=31_536_000 if pinned else None,
        )  # fmt: skip
        if pinned:
            response.cache_control.immutable = True
        else:
            response.cache_control.no_cache = True
        return response

    @bp.before_request
    def no_stream_yet() -> Response | None:
        _observe.current_stream.set(None)
        state = app_state()
        if state.backend is None and request.environ.get("wsgi.multiprocess"):
            return refuse_multiprocess(state)
        return None

    @bp.before_app_request
    def unrouted() -> Response | None:
        """JSON answers for requests under the blueprint that no view matched."""
        if request.routing_exception is None:
            return None
        state = current_app.extensions.get(EXTENSION_KEY)
        path = re.sub("/{2,}", "/", request.path)
        if state is None or not path.startswith(
            (state.url_prefix + "/streams", state.url_prefix + "/metrics")
        ):
            return None
        refused = routing_refusal(request)
        return refusal(refused) if refused is not None else None

    @bp.route(
        "/streams/<path:rest>",
        endpoint=f"no_such_path{REFUSAL_SUFFIX}",
        methods=sorted(_ALL_METHODS),
        merge_slashes=False,
    )
    def no_such_path(rest: str) -> NoReturn:
        error(404, "no such stream endpoint")

    # (A RequestRefused is answered by the app-wide handler that init_app registers.)
    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return refusal(RequestRefused.from_http(exc))

    @bp.after_request
    def cors(response: BaseResponse) -> BaseResponse:
        add_cors_headers(response, app_state().config.cors_origins)
        return response

    return bp
