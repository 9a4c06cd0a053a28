"""The Flask extension and its blueprint: HTTP in, engine calls, bytes out (via the wire module).

Endpoints (relative to the blueprint's prefix, ``/api`` by default):

* ``POST /streams`` starts a producer: ``201 {"stream_id", "stream_url"}``.
* ``GET /streams/<id>`` follows a stream as SSE (or NDJSON), resuming after ``Last-Event-ID``;
  ``?format=ai-sdk`` answers the Vercel AI SDK's UI message stream instead (see ``_aisdk``).
* ``GET /streams/<id>/status`` reports its state.
* ``POST /streams/<id>/cancel`` cancels it.

Bad input never produces a 5xx: every refusal is a 4xx with a JSON body ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import gevent
import gevent.monkey
from flask import Blueprint, Flask, Response, current_app, json, request, send_file, url_for
from werkzeug.exceptions import HTTPException

from . import _observe, _wire
from ._aisdk import HEADERS as AI_SDK_HEADERS
from ._aisdk import UIMessageStream
from ._config import SSEConfig
from ._engine import (
    Event,
    Producer,
    ShuttingDown,
    Stream,
    StreamLimitReached,
    StreamRegistry,
)
from ._guard import (
    REFUSAL_SUFFIX,
    RequestRefused,
    check_post,
    connection_shutter,
    read_json_body,
    routing_refusal,
    shut_connection,
)
from ._records import BlockStore, StreamRecord
from ._storage import SQLStore
from ._transport import DirectWriter, WriteWatch, encode, follow

if TYPE_CHECKING:
    from werkzeug.wrappers import Response as BaseResponse

    from ._redis import RedisBackend

__all__ = ["SSE", "InputError", "shut_connection", "shutdown"]

log = logging.getLogger("sse_blueprint")

EXTENSION_KEY = "sse_blueprint"
SSE_MIMETYPE = "text/event-stream"
NDJSON_MIMETYPE = "application/x-ndjson"
FORMAT_SSE, NDJSON, AI_SDK = "sse", "ndjson", "ai-sdk"
FORMATS = (FORMAT_SSE, NDJSON, AI_SDK)

#: The browser client, served at ``<prefix>/client.js``.
CLIENT_JS = os.path.join(os.path.dirname(__file__), "js", "index.js")
CLIENT_VERSION = "0.1.0"  # the npm package's version (js/package.json)

_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_EVENT_ID = re.compile(r"[0-9]{1,18}\Z")
_ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_HEARTBEAT = _wire.encode_comment("heartbeat")
#: Why streams are not served from several worker processes without Redis (logged and answered).
MULTIPROCESS_REFUSAL = (
    "sse-blueprint: this app runs in several worker processes but streams are kept in "
    "one process: set SSE_REDIS_URL to share them, or run a single worker (gunicorn -w 1)"
)

P = ParamSpec("P")
T = TypeVar("T")
Validator = Callable[[Mapping[str, Any]], Mapping[str, Any]]
#: ``authorize(action, metadata)``: may the current request do ``action`` ("create", "read",
#: "status", "cancel"; "metrics" with empty metadata) on a stream with this metadata? Runs in
#: the request context.
Authorizer = Callable[[str, Mapping[str, Any]], bool]
#: ``stream_metadata(producer, input)``: the metadata a new stream starts with (e.g. its owner).
MetadataHook = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


class InputError(ValueError):
    """Raise from a producer's ``validate`` function to refuse its input with a 400."""


class _ProducerSpec:
    __slots__ = ("func", "timeout", "validate")

    def __init__(self, func: Producer, validate: Validator | None, timeout: float | None) -> None:
        self.func = func
        self.validate = validate
        self.timeout = timeout


class _AppState:
    """What the extension keeps per app, in ``app.extensions["sse_blueprint"]``."""

    def __init__(self, ext: SSE, config: SSEConfig, store: BlockStore) -> None:
        self.ext = ext
        self.config = config
        self.store = store
        self.backend: RedisBackend | None = None
        if config.redis_url:
            from ._redis import RedisBackend  # redis is needed only with SSE_REDIS_URL

            self.backend = RedisBackend(
                config.redis_url,
                lease=config.redis_lease,
                retention=config.retention,
                make_mirror=self._mirror,
                store=store,
            )
        self.registry = StreamRegistry(
            max_streams=config.max_streams,
            retention=config.retention,
            store=store,
            backend=self.backend,
        )
        self.retry = _wire.encode_retry(config.retry_ms)
        self.clients_by_address: dict[str, int] = {}  # open responses per address, this worker
        self.streams_by_address: dict[str, int] = {}  # running streams per creator's address
        self.url_prefix = ""  # where the blueprint is mounted
        self.warned_multiprocess = False
        self.write_watch = WriteWatch(config.write_timeout)
        _STATES.add(self)

    @property
    def draining(self) -> bool:
        """Shutting down: set by :meth:`shutdown` (the registry refuses new streams from then)."""
        return self.registry.closing

    def shutdown(self, grace: float | None = None) -> tuple[int, int]:
        """See :meth:`SSE.shutdown`."""
        grace = self.config.shutdown_timeout if grace is None else grace
        if self.backend is not None:
            self.backend.release_mirrors()
        finished, stopped = self.registry.shutdown(grace, handover=self.backend is not None)
        log.info(
            "sse_blueprint: shut down (%d stream(s) finished in time, %d stopped)",
            finished,
            stopped,
        )
        return finished, stopped

    def _mirror(self, stream_id: str) -> Stream:
        return Stream(
            _no_producer,
            stream_id=stream_id,
            store=self.store,
            mirror=True,
            client_queue=self.config.client_queue,
            buffer_size=self.config.buffer_size,
        )


#: Every initialised app of this process, for :func:`shutdown` (a worker exiting).
_STATES: weakref.WeakSet[_AppState] = weakref.WeakSet()


def shutdown(grace: float | None = None) -> None:
    """Shut down every app's streams in this process at once (see :meth:`SSE.shutdown`).

    ``sse_blueprint.gunicorn`` calls this when a gunicorn worker begins to exit.
    """
    greenlets = [gevent.spawn(state.shutdown, grace) for state in list(_STATES)]
    gevent.joinall(greenlets)


def _no_producer(ctx: Any) -> None:
    raise RuntimeError("a mirror has no producer")


class SSE:
    """Resumable Server-Sent Events for a Flask app.

    ::

        sse = SSE()

        @sse.producer("echo")
        def echo(ctx):
            ctx.text(0, ctx.input.get("text", ""))

        app = Flask(__name__)
        sse.init_app(app)              # endpoints under /api/streams

    Producers run on their own greenlet, detached from the request that started them, so the
    app must be served by gevent (gunicorn ``-k gevent``, as in ``gunicorn.conf.py``).
    """

    def __init__(self, app: Flask | None = None, *, url_prefix: str = "/api") -> None:
        self.url_prefix = url_prefix
        self._producers: dict[str, _ProducerSpec] = {}
        self._authorize: Authorizer | None = None
        self._stream_metadata: MetadataHook | None = None
        self.blueprint = _make_blueprint()
        if app is not None:
            self.init_app(app)

    def init_app(
        self, app: Flask, *, url_prefix: str | None = None, store: BlockStore | None = None
    ) -> None:
        """Read the ``SSE_*`` config, set up the stream registry and mount the blueprint.

        Turn blocks go to ``SSE_DATABASE_URL`` (an :class:`~sse_blueprint.SQLStore`), or to
        ``store`` if you pass one of your own.
        """
        config = SSEConfig.from_mapping(app.config)
        _observe.configure_logging(config.log_format)
        if config.metrics:
            _observe.enable_metrics()
        if not gevent.monkey.is_module_patched("socket"):
            log.warning(
                "sse_blueprint: gevent has not patched this process; serve the app with "
                "gunicorn's gevent worker (gunicorn -k gevent) or producers will not run "
                "concurrently with requests"
            )
        if store is None:
            url = config.database_url
            if url is None:
                os.makedirs(app.instance_path, exist_ok=True)
                url = "sqlite:///" + os.path.join(app.instance_path, "sse_blueprint.sqlite3")
            store = SQLStore(url, create_tables=config.create_tables)
        state = app.extensions[EXTENSION_KEY] = _AppState(self, config, store)
        prefix = self.url_prefix if url_prefix is None else url_prefix
        state.url_prefix = prefix.rstrip("/")
        app.register_blueprint(self.blueprint, url_prefix=prefix)

    def producer(
        self,
        name: str,
        *,
        validate: Validator | None = None,
        timeout: float | None = None,
    ) -> Callable[[Producer], Producer]:
        """Register a producer under ``name`` (the ``producer`` of ``POST /streams``).

        ``validate(input)`` returns the input the producer gets, or raises :class:`InputError`
        (or ``ValueError``/``TypeError``) whose message is sent back with a 400. ``timeout``
        overrides ``SSE_STREAM_TIMEOUT`` for this producer.
        """

        def register(func: Producer) -> Producer:
            if name in self._producers:
                raise ValueError(f"producer {name!r} is already registered")
            self._producers[name] = _ProducerSpec(func, validate, timeout)
            return func

        return register

    def authorize(self, func: Authorizer) -> Authorizer:
        """Register the access check for every endpoint (a decorator).

        ``func(action, metadata)`` runs in the request context with ``action`` one of
        ``"create"``, ``"read"``, ``"status"``, ``"cancel"`` and the stream's metadata (for
        ``"create"``, the metadata it would start with), or ``"metrics"`` with empty metadata
        (the ``SSE_METRICS`` endpoint). Return False to refuse with a 403;
        raise ``werkzeug.exceptions.Unauthorized`` for a 401 (not logged in). ::

            @sse.stream_metadata
            def owner(producer, input):
                return {"owner": current_user.id}

            @sse.authorize
            def only_the_owner(action, metadata):
                if not current_user.is_authenticated:
                    raise Unauthorized()
                return metadata.get("owner") == current_user.id
        """
        self._authorize = func
        return func

    def stream_metadata(self, func: MetadataHook) -> MetadataHook:
        """Register the hook that gives a new stream its metadata (a decorator)."""
        self._stream_metadata = func
        return func

    def shutdown(self, grace: float | None = None, *, app: Flask | None = None) -> tuple[int, int]:
        """Stop serving streams, for a worker that is about to exit; returns (finished, stopped).

        New streams are refused (503 with ``Retry-After``). With Redis, every reader is released
        at once and its EventSource resumes on another worker; without it, readers stay to see
        their stream end here. Producers get ``grace`` seconds (``SSE_SHUTDOWN_TIMEOUT``) to
        finish; the rest end with ``error: server shutting down``. Everything is persisted
        before this returns. With gunicorn, the hooks in ``sse_blueprint.gunicorn`` call it
        when a worker is told to stop; call it yourself under another server.
        """
        return _state(app).shutdown(grace)

    def _check(self, action: str, metadata: Mapping[str, Any]) -> None:
        if self._authorize is not None and not self._authorize(action, metadata):
            _error(403, f"not allowed to {action} this stream")

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(self._producers)

    def registry(self, app: Flask | None = None) -> StreamRegistry:
        """The app's stream registry (the current app's by default)."""
        return _state(app).registry

    def active(self, stream_ids: list[str], *, app: Flask | None = None) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance sharing the backend."""
        state = _state(app)
        if state.backend is not None:
            return state.backend.active(stream_ids)
        found = {sid: state.registry.get(sid) for sid in stream_ids}
        return {sid: s is not None and not s.finished for sid, s in found.items()}

    def client_url(self) -> str:
        """The browser client's URL, pinned to this version (cached for a year):
        ``import { followStream } from "{{ sse.client_url() }}"``. Needs a request or app
        context (it is a ``url_for``)."""
        return url_for("sse.client_js", v=CLIENT_VERSION)

    def stream_response(
        self, stream_id: str, *, format: str = FORMAT_SSE, last_event_id: int = 0
    ) -> Response:
        """What ``GET /streams/<id>`` answers, for a view of your own: ``format`` is ``"sse"``,
        ``"ndjson"`` or ``"ai-sdk"`` (the AI SDK's UI message stream, always from the turn's
        start). E.g. the AI SDK's chat route answers its POST with the reply's stream. Runs the
        ``authorize`` hook ("read"); aborts with the same JSON errors as the endpoint.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        state = _state()
        found = _find(state, stream_id)
        self._check("read", found.metadata)
        return _answer(state, found, 0 if format == AI_SDK else last_event_id, format)

    def start(
        self,
        name: str,
        input: Mapping[str, Any] | None = None,
        *,
        app: Flask | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_complete: Callable[[Stream], None] | None = None,
    ) -> Stream:
        """Start a stream from Python (not HTTP): validate ``input`` and run producer ``name``.

        ``on_complete(stream)`` is called once the stream has ended, however it ended. Raises
        ``KeyError`` for an unknown producer, :class:`InputError` for refused input and
        :class:`~sse_blueprint.StreamLimitReached` when the registry is full.
        """
        state = _state(app)
        spec = self._producers.get(name)
        if spec is None:
            raise KeyError(f"unknown producer {name!r}")
        checked: Mapping[str, Any] = input or {}
        if spec.validate is not None:
            try:
                checked = spec.validate(checked)
            except (ValueError, TypeError) as exc:
                raise InputError(str(exc) or "invalid input") from exc
        timeout = spec.timeout if spec.timeout is not None else state.config.stream_timeout
        return state.registry.create(
            spec.func,
            checked,
            producer_name=name,
            timeout=timeout,
            client_queue=state.config.client_queue,
            buffer_size=state.config.buffer_size,
            metadata=metadata,
            max_event_bytes=state.config.max_event_bytes,
            on_complete=on_complete,
            durable=state.config.delivery == "durable",
            max_meta_bytes=state.config.max_meta_bytes,
            max_replayed_events=state.config.max_durable_events,
        )


# -- the blueprint -----------------------------------------------------------------------------


def _state(app: Flask | None = None) -> _AppState:
    target = app if app is not None else current_app
    try:
        state: _AppState = target.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError("SSE is not initialised on this app; call sse.init_app(app)") from None
    return state


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> NoReturn:
    """Abort the request with a JSON error body (answered by :func:`_refusal`)."""
    raise RequestRefused(status, message, headers)


def _storage_unavailable() -> NoReturn:
    _error(503, "stream storage is unavailable; retry shortly", {"Retry-After": "2"})


def _make_blueprint() -> Blueprint:
    bp = Blueprint("sse", __name__)

    def route(rule: str, methods: list[str]) -> Callable[[Callable[..., Any]], Any]:
        """Register a view, and JSON 405s for the other methods on the same rule."""

        def decorator(view: Callable[..., Any]) -> Any:
            bp.add_url_rule(rule, view_func=view, methods=methods, merge_slashes=False)
            others = sorted(_ALL_METHODS - set(methods) - ({"HEAD"} if "GET" in methods else set()))
            allowed = ", ".join(methods)

            def not_allowed(**_: Any) -> NoReturn:
                _error(405, f"method not allowed; use {allowed}", {"Allow": allowed})

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
        state = _state()
        if state.draining:
            _error(503, "the server is shutting down; retry", {"Retry-After": "1"})
        config = state.config
        check_post(request, config.cors_origins)
        address = request.remote_addr or ""
        if state.streams_by_address.get(address, 0) >= config.max_streams_per_address:
            _error(429, "too many running streams from your address", {"Retry-After": "5"})
        body = read_json_body(request, config.max_request_bytes, config.body_timeout)
        name = body.get("producer")
        if not isinstance(name, str) or not name:
            _error(400, '"producer" must be a non-empty string')
        input = body.get("input", {})
        if not isinstance(input, dict):
            _error(400, '"input" must be a JSON object')
        if name not in state.ext._producers:
            _error(400, f"unknown producer {name!r}")
        ext = state.ext
        metadata = dict(ext._stream_metadata(name, input)) if ext._stream_metadata else {}
        ext._check("create", metadata)
        counts = state.streams_by_address

        def finished(_: Stream) -> None:
            counts[address] -= 1
            if not counts[address]:
                del counts[address]

        try:
            stream = ext.start(name, input, metadata=metadata, on_complete=finished)
        except ValueError as exc:  # InputError
            _error(400, str(exc))
        except ShuttingDown:
            _error(503, "the server is shutting down; retry", {"Retry-After": "1"})
        except StreamLimitReached as exc:
            _error(503, f"too many streams: {exc}", {"Retry-After": "5"})
        except Exception as exc:
            _log_unavailable("could not start a stream", exc)
            _error(503, "the stream backend is unavailable; retry shortly", {"Retry-After": "2"})
        if not stream.finished:
            counts[address] = counts.get(address, 0) + 1
        url = url_for(".read_stream", stream_id=stream.id)
        return {"stream_id": stream.id, "stream_url": url}, 201, {"Location": url}

    @route("/streams/<stream_id>", ["GET"])
    def read_stream(stream_id: str) -> BaseResponse:
        state = _state()
        found = _find(state, stream_id)
        state.ext._check("read", found.metadata)
        fmt = _response_format()
        # The AI SDK reads every answer from the turn's start (its resume replaces the message).
        return _answer(state, found, 0 if fmt == AI_SDK else _last_event_id(), fmt)

    @route("/streams/<stream_id>/status", ["GET"])
    def stream_status(stream_id: str) -> dict[str, Any]:
        state = _state()
        found = _find(state, stream_id)
        state.ext._check("status", found.metadata)
        if isinstance(found, Stream) and found.mirror and state.backend is not None:
            shared = _store_call(state.backend.status, stream_id)
            if shared is not None:
                return {**shared, "subscribers": found.subscriber_count}
        return _status(found)

    @route("/streams/<stream_id>/cancel", ["POST"])
    def cancel_stream(stream_id: str) -> tuple[dict[str, Any], int]:
        state = _state()
        check_post(request, state.config.cors_origins)
        found = _find(state, stream_id)
        state.ext._check("cancel", found.metadata)
        if isinstance(found, Stream) and found.mirror and state.backend is not None:
            # Run elsewhere: end it in Redis; its owner hears of it and stops its producer.
            data = {"stream_id": stream_id}
            ended = _store_call(state.backend.end, stream_id, "cancelled", data) == "ok"
            shared = _store_call(state.backend.status, stream_id)
            body = {**shared, "subscribers": found.subscriber_count} if shared else _status(found)
            return body, 202 if ended else 200
        cancelled = isinstance(found, Stream) and found.cancel()
        return _status(found), 202 if cancelled else 200

    @route("/metrics", ["GET"])
    def metrics() -> BaseResponse:
        state = _state()
        if not state.config.metrics:
            _error(404, "metrics are off (set SSE_METRICS = true)")
        state.ext._check("metrics", {})
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
        state = _state()
        if state.backend is None and request.environ.get("wsgi.multiprocess"):
            return _refuse_multiprocess(state)
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
        return _refusal(refused) if refused is not None else None

    @bp.route(
        "/streams/<path:rest>",
        endpoint=f"no_such_path{REFUSAL_SUFFIX}",
        methods=sorted(_ALL_METHODS),
        merge_slashes=False,
    )
    def no_such_path(rest: str) -> NoReturn:
        _error(404, "no such stream endpoint")

    @bp.errorhandler(RequestRefused)
    def refused(exc: RequestRefused) -> Response:
        return _refusal(exc)

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _refusal(RequestRefused(exc.code or 500, exc.description or exc.name))

    @bp.after_request
    def cors(response: BaseResponse) -> BaseResponse:
        _add_cors_headers(response, _state().config.cors_origins)
        return response

    return bp


def _answer(state: _AppState, found: Stream | StreamRecord, last_id: int, fmt: str) -> Response:
    """The answer to a reader of ``found`` at ``last_id`` in format ``fmt``: ``sse``, ``ndjson``
    or ``ai-sdk`` (the AI SDK's UI message stream, always from the turn's start)."""
    ndjson = fmt == NDJSON
    config = state.config
    translate = None
    if fmt == AI_SDK:
        ui = UIMessageStream(found.id if isinstance(found, Stream) else found.stream_id)
        preamble, translate = ui.start(), ui.encode
    else:
        preamble = b"" if ndjson else state.retry
    if isinstance(found, Stream):
        terminal = found.terminal_event
        if terminal is not None and last_id >= terminal.id:
            return _no_content(ndjson)  # tells EventSource to stop reconnecting
        if state.draining and state.backend is not None:
            # This worker is leaving and another can serve the stream: come back there.
            if translate is not None:  # the AI SDK does not reconnect by itself
                _error(503, "this server is restarting; retry shortly", {"Retry-After": "1"})
            return _stream_response(iter([preamble]), fmt)
        if found.subscriber_count >= config.max_clients_per_stream:
            _error(429, "too many clients on this stream", {"Retry-After": "5"})
        address = request.remote_addr or ""
        if state.clients_by_address.get(address, 0) >= config.max_clients_per_address:
            _error(429, "too many open streams from your address", {"Retry-After": "5"})
        release = None  # frees this response's place in the count across workers (Redis)
        if state.backend is not None:
            place = state.backend.claim_client(address, config.max_clients_per_address)
            if place is None:
                _error(429, "too many open streams from your address", {"Retry-After": "5"})
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
                _storage_unavailable()
        if closer is not None:
            state.write_watch.add(sub, closer)
        body: Iterator[bytes] = follow(
            sub,
            config.heartbeat_interval,
            preamble,
            _wire.NDJSON_KEEPALIVE if ndjson else _HEARTBEAT,
            ndjson,
            watch=state.write_watch,
            counts=state.clients_by_address,
            address=address,
            direct=direct,
            release=release,
            first=first,
            translate=translate,
        )
    else:  # only in the store: it has ended
        if found.terminal_id is not None and last_id >= found.terminal_id:
            return _no_content(ndjson)
        events = _store_call(state.registry.replay, found, last_id)
        _observe.METRICS.catch_up("database")
        data = preamble + translate(events) if translate else encode(events, ndjson, preamble)
        body = iter([data])
    return _stream_response(body, fmt)


def _no_content(ndjson: bool) -> Response:
    """A ``204``: the client holds the stream's end. EventSource stops reconnecting on it.

    It carries the type the client asked for: a client library that checks the type of every
    answer (``httpx-sse`` raises on anything but ``text/event-stream``) then reads an empty
    stream instead of failing.
    """
    return Response(status=204, content_type=NDJSON_MIMETYPE if ndjson else SSE_MIMETYPE)


def _refusal(exc: RequestRefused) -> Response:
    """The JSON answer to a refused request; shuts the connection after it if asked."""
    response = current_app.response_class(
        json.dumps({"error": exc.message}) + "\n", status=exc.status, mimetype="application/json"
    )
    response.headers.update(exc.headers)
    shut = connection_shutter(request.environ) if exc.close else None
    if shut is not None:
        response.call_on_close(shut)
    return response


def _refuse_multiprocess(state: _AppState) -> Response:
    """This process is one of several (``wsgi.multiprocess``) and has no shared backend.

    Each process would run its streams alone: a reader served by another process would find
    the stream "running" in the database with no producer there, and end it as lost while it
    still runs. Refuse everything instead, loudly.
    """
    if not state.warned_multiprocess:
        state.warned_multiprocess = True
        log.error("%s", MULTIPROCESS_REFUSAL)
    return _refusal(RequestRefused(500, MULTIPROCESS_REFUSAL))


def _stream_response(body: Iterator[bytes], fmt: str) -> Response:
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


def _find(state: _AppState, stream_id: str) -> Stream | StreamRecord:
    if not _STREAM_ID.match(stream_id):
        _error(404, "stream not found")
    _observe.current_stream.set(stream_id)  # for the log lines of this request
    found = _store_call(state.registry.find, stream_id)
    if found is None:
        _error(404, "stream not found")
    return found


def _store_call(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call something that may read the store; an unreachable store is a 503, not a 500."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        _log_unavailable("stream storage or backend unavailable", exc)
        _storage_unavailable()


def _log_unavailable(what: str, exc: Exception) -> None:
    """An outage (database, Redis) is a warning; anything else is a bug and gets a traceback."""
    if _is_outage(exc):
        log.warning("%s: %s", what, exc)
    else:
        log.exception(what)


def _is_outage(exc: BaseException) -> bool:
    from sqlalchemy import exc as sa_exc

    outages: tuple[type[BaseException], ...] = (
        OSError,
        sa_exc.OperationalError,
        sa_exc.TimeoutError,
        sa_exc.DisconnectionError,
    )
    if isinstance(exc, outages):
        return True
    try:
        from ._redis import is_transient
    except ImportError:  # redis is not installed
        return False
    return is_transient(exc)


def _last_event_id() -> int:
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
    if not _EVENT_ID.match(raw):
        _error(400, "Last-Event-ID must be a non-negative integer event id of this stream")
    return int(raw)


def _response_format() -> str:
    """``?format=`` (``sse``, ``ndjson``, ``ai-sdk``), else what ``Accept`` prefers."""
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            _error(400, 'format must be "sse", "ndjson" or "ai-sdk"')
        return fmt
    best = request.accept_mimetypes.best_match([SSE_MIMETYPE, NDJSON_MIMETYPE])
    return NDJSON if best == NDJSON_MIMETYPE else FORMAT_SSE


def _status(found: Stream | StreamRecord) -> dict[str, Any]:
    if isinstance(found, StreamRecord):
        return {
            "stream_id": found.stream_id,
            "state": found.state,
            "last_event_id": found.terminal_id or found.last_event_id,
            "producer": found.producer,
            "created_at": found.created_at,
            "finished_at": found.finished_at,
            "subscribers": 0,
            "metadata": dict(found.metadata),
        }
    return {
        "stream_id": found.id,
        "state": found.state.value,
        "last_event_id": found.last_event_id,
        "producer": found.producer_name,
        "created_at": found.created_at,
        "finished_at": found.finished_at,
        "subscribers": found.subscriber_count,
        "metadata": found.metadata,
    }


def _add_cors_headers(response: BaseResponse, allowed: tuple[str, ...]) -> None:
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
