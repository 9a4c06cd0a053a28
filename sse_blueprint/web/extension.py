"""The Flask extension (:class:`SSE`): producers by name, the hooks, ``init_app`` and the
Python-side calls (start a stream, which are active, a stream's response for a view of yours).

Imports the views, the state, the answers, the config, the engine and the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import gevent.monkey
from flask import Flask, Response, url_for
from werkzeug.exceptions import HTTPException

from .. import _observe
from .._config import SSEConfig
from ..engine import Producer, SharedBackend, Stream, StreamRegistry
from ..storage.records import BlockStore
from ..storage.sql import SQLStore
from .answers import AI_SDK, FORMAT_SSE, FORMATS, answer, error, find, refusal
from .guard import RequestRefused
from .state import EXTENSION_KEY, AppState, app_state
from .views import CLIENT_VERSION, make_blueprint

__all__ = ["SSE", "Authorizer", "InputError", "MetadataHook", "Validator"]

log = logging.getLogger("sse_blueprint")

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


class Access:
    """The app's access hooks as the views ask them: may this request do that, and what
    metadata a new stream starts with (:meth:`SSE.authorize`, :meth:`SSE.stream_metadata`)."""

    __slots__ = ("authorizer", "metadata_hook")

    def __init__(self) -> None:
        self.authorizer: Authorizer | None = None
        self.metadata_hook: MetadataHook | None = None

    def check(self, action: str, metadata: Mapping[str, Any]) -> None:
        """Refuse the request with a 403 unless the authorizer allows ``action``."""
        if self.authorizer is not None and not self.authorizer(action, metadata):
            error(403, f"not allowed to {action} this stream")

    def metadata_for(self, producer: str, input: Mapping[str, Any]) -> dict[str, Any]:
        hook = self.metadata_hook
        return dict(hook(producer, input)) if hook is not None else {}


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
        self.access = Access()
        self.blueprint = make_blueprint()
        if app is not None:
            self.init_app(app)

    def init_app(
        self,
        app: Flask,
        *,
        url_prefix: str | None = None,
        store: BlockStore | None = None,
        backend: SharedBackend | None = None,
    ) -> None:
        """Read the ``SSE_*`` config, set up the stream registry and mount the blueprint.

        Turn blocks go to ``SSE_DATABASE_URL`` (an :class:`~sse_blueprint.SQLStore`), or to
        ``store`` if you pass one of your own. Streams are shared between workers through
        ``SSE_REDIS_URL``, or through ``backend`` if you pass one (for tests of several workers
        in one process: :class:`~sse_blueprint.backends.memory.MemoryBackend`).
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
        state = app.extensions[EXTENSION_KEY] = AppState(self, config, store, backend)
        prefix = self.url_prefix if url_prefix is None else url_prefix
        state.url_prefix = prefix.rstrip("/")
        app.register_blueprint(self.blueprint, url_prefix=prefix)
        # The library's refusals, in the blueprint's views and in a view of the app's own
        # (``stream_response``: an unknown stream, a refused reader, storage down): JSON
        # answers, not a 500.
        app.register_error_handler(RequestRefused, refusal)

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
        self.access.authorizer = func
        return func

    def stream_metadata(self, func: MetadataHook) -> MetadataHook:
        """Register the hook that gives a new stream its metadata (a decorator)."""
        self.access.metadata_hook = func
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
        return app_state(app).shutdown(grace)

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(self._producers)

    def registry(self, app: Flask | None = None) -> StreamRegistry:
        """The app's stream registry (the current app's by default)."""
        return app_state(app).registry

    def active(self, stream_ids: list[str], *, app: Flask | None = None) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance sharing the backend."""
        return app_state(app).streams.active(stream_ids)

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
        state = app_state()
        found = find(state, stream_id)
        try:
            self.access.check("read", found.metadata)
        except HTTPException as exc:  # the hook's Unauthorized: JSON, as from the endpoint
            raise RequestRefused.from_http(exc) from None
        return answer(state, found, 0 if format == AI_SDK else last_event_id, format)

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
        state = app_state(app)
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
