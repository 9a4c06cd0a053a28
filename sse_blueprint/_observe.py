"""Observability: Prometheus metrics (opt-in) and logs that carry the stream id.

Metrics. The engine and the web layer report to :data:`METRICS`, a no-op until
:func:`enable_metrics` swaps in :class:`PrometheusMetrics` (``SSE_METRICS = true``). With several
gunicorn workers, set ``PROMETHEUS_MULTIPROC_DIR`` (the reference ``gunicorn.conf.py`` does) and
every worker's values are summed when any of them serves the endpoint.

Logs. Every record of the ``sse_blueprint`` logger has a ``stream_id`` attribute: the stream
the line is about (``None`` for worker-wide lines). It comes from ``extra={"stream_id": ...}``,
else from the greenlet's context (a producer, a persister, a request for a stream), so a format
may use ``%(stream_id)s``. :class:`JSONFormatter` writes one JSON object per line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
import traceback
from typing import Any

__all__ = [
    "METRICS",
    "JSONFormatter",
    "Metrics",
    "PrometheusMetrics",
    "current_stream",
    "enable_metrics",
    "render_metrics",
    "stream_log",
]

log = logging.getLogger("sse_blueprint")


def stream_log(
    level: int, stream_id: str, message: str, *args: object, exc_info: Any = None
) -> None:
    """Log ``"stream <id>: " + message % args`` with the id in the record (``stream_id``)."""
    if log.isEnabledFor(level):
        log.log(
            level, "stream %s: " + message, stream_id, *args, exc_info=exc_info,
            extra={"stream_id": stream_id}, stacklevel=2,
        )  # fmt: skip


#: The stream the current greenlet works for (greenlets each have their own context).
current_stream: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sse_blueprint_stream", default=None
)


class _StreamIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "stream_id", None) is None:
            record.stream_id = current_stream.get()
        return True


log.addFilter(_StreamIdFilter())


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, stream_id, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "stream_id": getattr(record, "stream_id", None),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str) -> None:
    """``SSE_LOG_FORMAT``: "json" or "text" send the library's INFO+ lines to stderr."""
    if not fmt or any(getattr(h, "_sse_blueprint", False) for h in log.handlers):
        return
    handler = logging.StreamHandler()
    handler._sse_blueprint = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(stream_id)s] %(message)s")
        )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class Metrics:
    """What the library reports. This base class ignores it all (metrics off)."""

    def stream_started(self, producer: str) -> None:
        pass

    def stream_finished(self, producer: str, state: str) -> None:
        pass

    def producer_error(self, producer: str) -> None:
        pass

    def event(self) -> None:
        """A producer appended an event."""

    def client_connected(self) -> None:
        pass

    def client_disconnected(self) -> None:
        pass

    def sent(self, events: int, nbytes: int) -> None:
        """A write to a client: ``events`` events (0 for a heartbeat) in ``nbytes`` bytes."""

    def cut(self) -> None:
        """A client too far behind was cut (it resumes from its last id)."""

    def catch_up(self, source: str) -> None:
        """A reader's backlog came from ``"buffer"`` or from ``"database"``."""

    def persisted(self, seconds: float) -> None:
        pass

    def persist_failed(self) -> None:
        pass


class PrometheusMetrics(Metrics):
    """Metrics in prometheus_client objects (multi-process aware)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._started = Counter(
            "sse_streams_started", "Streams started, by producer.", ["producer"], registry=r
        )
        self._finished = Counter(
            "sse_streams_finished",
            "Streams ended, by producer and terminal state (done, error, cancelled).",
            ["producer", "state"],
            registry=r,
        )
        self._producer_errors = Counter(
            "sse_producer_errors", "Producers that raised.", ["producer"], registry=r
        )
        self._active = Gauge(
            "sse_streams_active",
            "Streams whose producer runs in this process.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._clients = Gauge(
            "sse_clients_connected",
            "Open event-stream responses.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._events = Counter("sse_events", "Events appended by producers.", registry=r)
        self._sent = Counter("sse_events_sent", "Events written to clients.", registry=r)
        self._bytes = Counter("sse_bytes_sent", "Bytes written to event streams.", registry=r)
        self._cuts = Counter(
            "sse_clients_cut", "Clients cut for lagging too far (they resume).", registry=r
        )
        self._catch_ups = Counter(
            "sse_catchups",
            "Readers that joined or resumed, by where their backlog came from.",
            ["source"],
            registry=r,
        )
        self._persist = Histogram(
            "sse_persist_seconds",
            "Time to write a stream's changed blocks to the database.",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self._persist_failures = Counter(
            "sse_persist_failures", "Failed writes to the database (retried).", registry=r
        )

    def stream_started(self, producer: str) -> None:
        self._started.labels(producer).inc()
        self._active.inc()

    def stream_finished(self, producer: str, state: str) -> None:
        self._finished.labels(producer, state).inc()
        self._active.dec()

    def producer_error(self, producer: str) -> None:
        self._producer_errors.labels(producer).inc()

    def event(self) -> None:
        self._events.inc()

    def client_connected(self) -> None:
        self._clients.inc()

    def client_disconnected(self) -> None:
        self._clients.dec()

    def sent(self, events: int, nbytes: int) -> None:
        if events:
            self._sent.inc(events)
        self._bytes.inc(nbytes)

    def cut(self) -> None:
        self._cuts.inc()

    def catch_up(self, source: str) -> None:
        self._catch_ups.labels(source).inc()

    def persisted(self, seconds: float) -> None:
        self._persist.observe(seconds)

    def persist_failed(self) -> None:
        self._persist_failures.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text (every worker's values with a multi-process directory)."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS: Metrics = Metrics()


def enable_metrics() -> PrometheusMetrics:
    """Start recording metrics in this process (once; later calls return the same object)."""
    global METRICS
    if not isinstance(METRICS, PrometheusMetrics):
        try:
            METRICS = PrometheusMetrics()
        except ImportError as exc:
            raise RuntimeError(
                "SSE_METRICS needs prometheus_client: pip install 'sse-blueprint[metrics]'"
            ) from exc
    return METRICS


def render_metrics() -> tuple[bytes, str]:
    return enable_metrics().render()
