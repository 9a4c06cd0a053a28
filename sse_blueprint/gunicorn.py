"""Graceful shutdown under gunicorn's gevent worker.

gunicorn tells a worker to stop (SIGTERM, a restart on ``HUP``, ``max_requests``) by setting
``worker.alive`` to False; it then stops accepting and waits up to ``graceful_timeout`` for its
connections to end. Open event streams and idle keep-alive connections never end by themselves,
so without help every shutdown takes the whole ``graceful_timeout`` and ends in a kill. These
hooks make it quick and lossless:

* as soon as the worker is told to stop, :func:`sse_blueprint.shutdown` runs (see
  :meth:`SSE.shutdown <sse_blueprint.SSE.shutdown>`): no new streams, readers released (they
  resume on another worker) or shown their stream's end, producers given
  ``SSE_SHUTDOWN_TIMEOUT`` seconds and then stopped, everything persisted;
* idle keep-alive connections are closed at once, and busy ones right after their response;
* the worker does not exit before the shutdown has persisted everything.

``post_worker_init`` also lets live events be written straight to the clients' sockets (one
greenlet per stream serves all its idle readers; see ``SSE_DIRECT_WRITES``) when the worker is
gevent's and speaks plain HTTP/1.x (not the uWSGI protocol, not HTTP/2), and lets idle readers
take their connections from gunicorn (``SSE_HOLD_IDLE_READERS``, :mod:`sse_blueprint._held`):
its greenlet for such a connection then ends quietly, and the shutdown waits for them.

Add them to ``gunicorn.conf.py``; import inside the functions, because the config file is read
by the arbiter before gevent patches the workers::

    def post_worker_init(worker):
        from sse_blueprint.gunicorn import post_worker_init
        post_worker_init(worker)

    def worker_exit(server, worker):
        from sse_blueprint.gunicorn import worker_exit
        worker_exit(server, worker)
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from typing import Any

import gevent

from . import _transport
from ._transport import handed_over, shut_connection
from .web import shutdown
from .web import state as web_state

__all__ = ["post_worker_init", "worker_exit"]

log = logging.getLogger("sse_blueprint")

#: The exit status by which a gunicorn worker tells the arbiter it cannot boot (it then halts).
WORKER_BOOT_ERROR = 3
#: Seconds between looks at ``worker.alive`` (gunicorn itself looks once a second).
POLL = 0.1


class _Connections:
    """The worker's client connections, and which of them are between requests."""

    def __init__(self) -> None:
        self.busy: dict[socket.socket, bool] = {}
        self.draining = False

    def close_idle(self) -> None:
        for sock, busy in list(self.busy.items()):
            if not busy:
                shut_connection(sock)


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: track connections and start the shutdown when the worker is told to stop.

    It also moves everything made at start-up (modules, the app) out of the garbage collector's
    reach (``gc.freeze()``): a full collection then scans only what requests made since, which
    keeps its pauses out of the latency tail. And it sets the collector's thresholds to
    ``SSE_GC_THRESHOLDS`` (default 50,000 / 50 / 10, against Python's 700 / 10 / 10): a busy
    worker's events live a few seconds, long enough with Python's to reach the oldest
    generation, whose full collections (90 ms each with 2,000 streams) then came every second or
    two and took a sixth of the worker's time. Set it empty to keep Python's.

    A worker that is one of several but whose app keeps streams in-process (no
    ``SSE_REDIS_URL``) refuses to boot: gunicorn then stops with "Worker failed to boot".
    """
    workers = getattr(worker.cfg, "workers", 1)
    if workers > 1 and any(state.backend is None for state in list(web_state.STATES)):
        log.error("%s (%d workers)", web_state.MULTIPROCESS_REFUSAL, workers)
        sys.exit(WORKER_BOOT_ERROR)
    gc.collect()
    gc.freeze()
    thresholds = [state.config.gc_thresholds for state in list(web_state.STATES)]
    if thresholds and thresholds[0] is not None:
        gc.set_threshold(*thresholds[0])
    _transport.direct_writes_possible = _speaks_plain_http(worker)
    conns = _Connections()
    handle, handle_request = worker.handle, worker.handle_request

    def tracked_handle(listener: Any, client: socket.socket, addr: Any) -> None:
        conns.busy[client] = False
        try:
            handle(listener, client, addr)
        finally:
            conns.busy.pop(client, None)

    def tracked_request(listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> Any:
        conns.busy[sock] = True
        try:
            return handle_request(listener_name, req, sock, addr)
        except OSError:
            if sock in handed_over:
                # A held reader took the connection (see sse_blueprint._held): gunicorn's
                # last chunk found no descriptor. This greenlet is done with it.
                raise StopIteration from None
            raise
        finally:
            handed_over.discard(sock)
            conns.busy[sock] = False
            if conns.draining:
                # The response is complete: no more requests on this connection.
                shut_connection(sock)

    worker.handle, worker.handle_request = tracked_handle, tracked_request

    def watch() -> None:
        while worker.alive:
            gevent.sleep(POLL)
        log.info("sse_blueprint: worker %s is stopping; shutting streams down", os.getpid())
        conns.draining = True
        conns.close_idle()
        shutdown()
        # The readers held without a greenlet were shown their end (or released); gunicorn
        # does not wait for them, so this does, before the worker may exit.
        for state in list(web_state.STATES):
            state.held.join(worker.cfg.graceful_timeout)

    worker._sse_shutdown = gevent.spawn(watch)


def _speaks_plain_http(worker: Any) -> bool:
    """Whether the worker frames HTTP/1.1 responses itself over gevent sockets."""
    from gunicorn.workers.ggevent import GeventWorker

    cfg = worker.cfg
    protocols = getattr(cfg, "http_protocols", None) or ["h1"]
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",")]
    return (
        isinstance(worker, GeventWorker)
        and getattr(cfg, "protocol", "http") == "http"
        and list(protocols) == ["h1"]
    )


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: do not let the worker exit before the shutdown has persisted everything."""
    if getattr(worker, "pid", None) != os.getpid():
        return  # called in the arbiter
    watcher = getattr(worker, "_sse_shutdown", None)
    if watcher is None:
        return
    worker.alive = False
    watcher.join(timeout=worker.cfg.graceful_timeout)
