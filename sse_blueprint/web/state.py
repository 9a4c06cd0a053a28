"""What the extension keeps per app (:class:`AppState`), and the shutdown of every app in this
process (:func:`shutdown`, called by the gunicorn hooks).

Imports the engine, the config, the transport's write watch and (only with ``SSE_REDIS_URL``) the
Redis backend; not the views.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import gevent
from flask import Flask, current_app

from .. import _wire
from .._config import SSEConfig
from .._held import HeldReaders
from .._transport import WriteWatch
from ..engine import Mirror, SharedBackend, StreamRegistry
from ..storage.records import BlockStore
from .service import StreamService

if TYPE_CHECKING:
    from .extension import SSE

__all__ = ["EXTENSION_KEY", "MULTIPROCESS_REFUSAL", "STATES", "AppState", "app_state", "shutdown"]

log = logging.getLogger("sse_blueprint")

EXTENSION_KEY = "sse_blueprint"
#: Why streams are not served from several worker processes without Redis (logged and answered).
MULTIPROCESS_REFUSAL = (
    "sse-blueprint: this app runs in several worker processes but streams are kept in "
    "one process: set SSE_REDIS_URL to share them, or run a single worker (gunicorn -w 1)"
)


class AppState:
    """What the extension keeps per app, in ``app.extensions["sse_blueprint"]``."""

    def __init__(
        self, ext: SSE, config: SSEConfig, store: BlockStore, backend: SharedBackend | None = None
    ) -> None:
        self.ext = ext
        self.config = config
        self.store = store
        self.backend = backend
        if backend is None and config.redis_url:
            from ..backends.redis import RedisBackend  # redis is needed only with SSE_REDIS_URL

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
        self.streams = StreamService(self.registry, self.backend)
        self.retry = _wire.encode_retry(config.retry_ms)
        self.clients_by_address: dict[str, int] = {}  # open responses per address, this worker
        self.streams_by_address: dict[str, int] = {}  # running streams per creator's address
        self.url_prefix = ""  # where the blueprint is mounted
        self.warned_multiprocess = False
        self.write_watch = WriteWatch(config.write_timeout)
        self.held = HeldReaders(config.heartbeat_interval, _wire.HEARTBEAT, _wire.NDJSON_KEEPALIVE)
        STATES.add(self)

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

    def _mirror(self, stream_id: str) -> Mirror:
        return Mirror(
            stream_id,
            store=self.store,
            client_queue=self.config.client_queue,
            buffer_size=self.config.buffer_size,
        )


#: Every initialised app of this process, for :func:`shutdown` (a worker exiting).
STATES: weakref.WeakSet[AppState] = weakref.WeakSet()


def shutdown(grace: float | None = None) -> None:
    """Shut down every app's streams in this process at once (see :meth:`SSE.shutdown`).

    ``sse_blueprint.gunicorn`` calls this when a gunicorn worker begins to exit.
    """
    greenlets = [gevent.spawn(state.shutdown, grace) for state in list(STATES)]
    gevent.joinall(greenlets)


def app_state(app: Flask | None = None) -> AppState:
    target = app if app is not None else current_app
    try:
        state: AppState = target.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError("SSE is not initialised on this app; call sse.init_app(app)") from None
    return state
