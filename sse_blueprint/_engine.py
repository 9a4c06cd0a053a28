"""The stream engine: producers, the live buffer, fan-out and resume. Imports no Flask.

One :class:`Stream` per producer run. The producer runs on its own greenlet and appends events to
the stream's live buffer, an append-only log of :class:`Event` objects whose integer ids strictly
increase. Every event is encoded once, when it is sent, and shared by all subscribers.

A :class:`Subscription` is a cursor into that log, not a queue: the producer never copies an event
per subscriber, and a subscriber that wakes up takes everything it has pending in one batch (one
write to its socket). A subscriber that falls more than ``client_queue`` events behind is *cut*: it
stops being a subscriber, its response ends, and the client resumes with ``Last-Event-ID``.
Nothing is ever dropped for a subscriber that stays.

Everything here runs on one OS thread under gevent. Greenlets switch only at blocking calls, so a
method that does not block is atomic: :meth:`Stream.subscribe` takes its snapshot and registers
the cursor without a lock, and no event can slip in between (see DESIGN notes in ARCHITECTURE.md).
"""

from __future__ import annotations

import bisect
import enum
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
import gevent.event
from gevent import Greenlet

from . import _wire

__all__ = [
    "Event",
    "Producer",
    "ProducerContext",
    "ProducerError",
    "Stream",
    "StreamClosed",
    "StreamLimitReached",
    "StreamRegistry",
    "StreamState",
    "Subscription",
    "TERMINAL_EVENTS",
    "new_stream_id",
]

log = logging.getLogger("sse_blueprint")

TERMINAL_EVENTS = frozenset({"done", "error", "cancelled"})


class StreamState(enum.StrEnum):
    """Life-cycle of a stream. Only ``RUNNING`` is not terminal."""

    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


class StreamClosed(Exception):
    """Raised in a producer that sends (or sleeps) after its stream was cancelled or timed out.

    Producers need not catch it: the stream already holds its terminal event.
    """


class ProducerError(Exception):
    """Raise in a producer to end the stream with an ``error`` event showing this message.

    Any other exception also ends the stream with ``error``, but with a generic message, so that
    internals never leak to clients.
    """


class StreamLimitReached(Exception):
    """The registry already runs as many streams as it may."""


def new_stream_id() -> str:
    """A new stream id: 128 random bits, URL-safe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


class Event:
    """One event of a stream: integer ``id``, ``event`` name and a JSON object ``data``.

    The JSON and SSE encodings are made once, when the event is created, and shared by every
    subscriber; NDJSON is made on first use.
    """

    __slots__ = ("_ndjson", "data", "event", "id", "json", "sse")

    def __init__(self, id: int, event: str, data: Mapping[str, Any]) -> None:
        self.id = id
        if not event:
            raise ValueError("event name must be a non-empty string")
        self.event = _wire.check_field("event", event)
        self.data = data
        if not isinstance(data, Mapping):
            raise ValueError(
                f"event data must be a mapping (a JSON object), not {type(data).__name__}"
            )
        try:
            self.json = _wire.dumps(data)
        except TypeError as exc:
            raise ValueError(f"event data is not JSON-serializable: {exc}") from exc
        self.sse = _wire.encode_event(self.json, id=id, event=event)
        self._ndjson: bytes | None = None

    @property
    def ndjson(self) -> bytes:
        if self._ndjson is None:
            self._ndjson = _wire.encode_ndjson(self.id, self.event, self.json)
        return self._ndjson

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def __repr__(self) -> str:
        return f"Event(id={self.id}, event={self.event!r}, data={self.json})"


def _event_id(event: Event) -> int:
    return event.id


class ProducerContext:
    """What a producer gets: its input, a way to send events, and the cancellation signal.

    >>> def countdown(ctx: ProducerContext) -> dict[str, object]:
    ...     for n in range(ctx.input.get("from", 3), 0, -1):
    ...         ctx.send("tick", {"n": n})
    ...         ctx.sleep(1)
    ...     return {"liftoff": True}
    """

    __slots__ = ("_stream", "input")

    def __init__(self, stream: Stream, input: Mapping[str, Any]) -> None:
        self._stream = stream
        self.input = input

    @property
    def stream_id(self) -> str:
        return self._stream.id

    @property
    def metadata(self) -> dict[str, Any]:
        return self._stream.metadata

    @property
    def cancelled(self) -> bool:
        """True once the stream is over (cancelled, timed out): stop producing."""
        return self._stream.finished

    def send(self, event: str, data: Mapping[str, Any]) -> int:
        """Append an event to the stream and return its id.

        Raises :class:`StreamClosed` if the stream is already over, and ``ValueError`` for an
        event name that cannot be sent (terminal names, CR/LF/NUL) or data that is not JSON.
        """
        if event in TERMINAL_EVENTS:
            raise ValueError(
                f"{event!r} is a terminal event; return from the producer (done), raise "
                "ProducerError (error), or cancel the stream instead"
            )
        return self._stream._append(event, data).id

    def text(self, block: int, text: str) -> int:
        """Send a ``text_delta``: append ``text`` to block ``block``."""
        return self.send("text_delta", {"block": block, "text": text})

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once and raise :class:`StreamClosed` if the stream ends meanwhile."""
        if self._stream._closed.wait(seconds):
            raise StreamClosed(self._stream.id)

    def end_block(self, block: int) -> None:
        """Mark block ``block`` finished. The buffer may now persist and trim it."""
        self._stream._end_block(block)


Producer = Callable[[ProducerContext], "Mapping[str, Any] | None"]


class Subscription:
    """A reader's cursor into a stream's live buffer.

    Use :meth:`poll` in a loop; it returns the pending events (several at once when the reader
    was busy) or an empty list after ``timeout`` seconds without news, the moment to write a
    heartbeat. Stop once :attr:`done` (cut, closed, or everything up to the terminal event
    taken). Always :meth:`close` (in ``finally``).

    ``on_cut`` is called if the subscriber is cut while it is *not* waiting in :meth:`poll`,
    that is while it is blocked writing to a client that stopped reading; the web layer uses it
    to shut that connection, which frees the greenlet stuck in the write.
    """

    __slots__ = ("_after", "_pos", "_stream", "_waiting", "closed", "cut", "on_cut")

    def __init__(
        self, stream: Stream, pos: int, after: int, on_cut: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._pos = pos  # absolute index in the stream's log of the next event to deliver
        self._after = after  # deliver only ids greater than this (the client's Last-Event-ID)
        self._waiting = False
        self.cut = False
        self.closed = False
        self.on_cut = on_cut

    @property
    def stream(self) -> Stream:
        return self._stream

    @property
    def lag(self) -> int:
        """Events appended but not yet taken by this subscriber."""
        return self._stream._end - self._pos

    @property
    def done(self) -> bool:
        """Nothing more will come: cut, closed, or the stream ended and all of it was taken."""
        return self.cut or self.closed or (self._stream.finished and self._pos >= self._stream._end)

    def poll(self, timeout: float | None) -> list[Event]:
        """Return pending events, waiting up to ``timeout`` seconds for some."""
        stream = self._stream
        if self._pos >= stream._end and not self.done:
            self._waiting = True
            try:
                stream._wait_for_news(timeout)
            finally:
                self._waiting = False
        if self.cut or self.closed:
            return []
        events = stream._events_from(self._pos)
        self._pos += len(events)
        if events and events[0].id <= self._after:
            # Only for a Last-Event-ID ahead of the stream: skip what the client claims to have.
            events = [e for e in events if e.id > self._after]
        return events

    def close(self) -> None:
        """Stop following the stream. Idempotent."""
        if not self.closed:
            self.closed = True
            self._stream._subscribers.discard(self)


class Stream:
    """One producer run and its live buffer. See the module docstring.

    Construct through :meth:`StreamRegistry.create`; call :meth:`start` to run the producer.
    """

    def __init__(
        self,
        producer: Producer,
        input: Mapping[str, Any] | None = None,
        *,
        stream_id: str | None = None,
        producer_name: str = "",
        timeout: float | None = None,
        client_queue: int = 2048,
        metadata: Mapping[str, Any] | None = None,
        on_complete: Callable[[Stream], None] | None = None,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.producer_name = producer_name
        self.input: Mapping[str, Any] = input or {}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.state = StreamState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.client_queue = client_queue
        self.timeout = timeout
        self._producer = producer
        self._on_complete = on_complete
        self._greenlet: Greenlet | None = None
        self._timer: Greenlet | None = None
        self._closed = gevent.event.Event()  # set when the terminal event is in the log
        # The live buffer: _log[i] has absolute index _base + i; _end = _base + len(_log).
        self._log: list[Event] = []
        self._base = 0
        self._end = 0
        self._last_id = 0
        self._subscribers: set[Subscription] = set()
        # Lower bound of every subscriber's position, refreshed when a lag scan runs.
        self._min_pos_hint = 0
        self._news: gevent.event.Event | None = None
        self.terminal_event: Event | None = None

    # -- producer side -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the producer on its own greenlet (once)."""
        if self._greenlet is not None:
            raise RuntimeError("stream already started")
        self._append("start", {"stream_id": self.id, "producer": self.producer_name})
        self._greenlet = gevent.spawn(self._run)
        if self.timeout:
            self._timer = gevent.spawn_later(self.timeout, self._expire)

    def _run(self) -> None:
        ctx = ProducerContext(self, self.input)
        try:
            result: object = self._producer(ctx)
        except StreamClosed:
            pass  # cancelled or timed out: the terminal event is already there
        except ProducerError as exc:
            self._finish(StreamState.ERROR, {"message": str(exc) or "producer failed"})
        except Exception:
            log.exception("producer %r of stream %s failed", self.producer_name, self.id)
            self._finish(StreamState.ERROR, {"message": "producer failed"})
        else:
            if not isinstance(result, Mapping):
                if result is not None:
                    log.error("producer %r returned %r, not a mapping", self.producer_name, result)
                result = {}
            self._finish(StreamState.DONE, dict(result))
        finally:
            # A producer that returns or dies before its end leaves no stream "running forever".
            if not self.finished:
                self._finish(StreamState.ERROR, {"message": "producer stopped"})

    def _expire(self) -> None:
        self._timer = None
        if self._finish(StreamState.ERROR, {"message": "stream timed out"}):
            self._stop_producer()

    def cancel(self, reason: str | None = None) -> bool:
        """End the stream with ``cancelled`` and stop its producer. False if it had ended."""
        data: dict[str, Any] = {"reason": reason} if reason else {}
        if not self._finish(StreamState.CANCELLED, data):
            return False
        self._stop_producer()
        return True

    def _stop_producer(self) -> None:
        g = self._greenlet
        if g is not None and not g.dead and g is not gevent.getcurrent():
            # Raised where the producer blocks (sleep, I/O); its ``finally`` blocks run.
            g.kill(StreamClosed(self.id), block=False)

    def _append(self, event: str, data: Mapping[str, Any]) -> Event:
        if self.terminal_event is not None:
            raise StreamClosed(self.id)
        ev = Event(self._last_id + 1, event, data)
        self._last_id = ev.id
        self._log.append(ev)
        self._end += 1
        if self._end - self._min_pos_hint > self.client_queue:
            self._cut_laggards()
        news = self._news
        if news is not None:
            self._news = None
            news.set()
        return ev

    def _finish(self, state: StreamState, data: Mapping[str, Any]) -> bool:
        if self.terminal_event is not None:
            return False
        name = {
            StreamState.DONE: "done",
            StreamState.ERROR: "error",
            StreamState.CANCELLED: "cancelled",
        }[state]
        self.terminal_event = self._append(name, {"stream_id": self.id, **data})
        self.state = state
        self.finished_at = time.time()
        self._closed.set()
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        if self._on_complete is not None:
            try:
                self._on_complete(self)
            except Exception:
                log.exception("on_complete hook of stream %s failed", self.id)
        return True

    def _end_block(self, block: int) -> None:
        """Hook for persistence; the in-memory buffer keeps everything."""

    # -- reader side ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.terminal_event is not None

    @property
    def last_event_id(self) -> int:
        return self._last_id

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the stream has ended; True if it has."""
        return bool(self._closed.wait(timeout))

    def subscribe(
        self, last_event_id: int = 0, *, on_cut: Callable[[], None] | None = None
    ) -> Subscription:
        """Follow the stream from the first event whose id is greater than ``last_event_id``.

        The snapshot (which events are already there) and the registration (which events will
        be delivered live) happen in one step with no blocking call in between, so under gevent
        no event can be missed or delivered twice, however busy the producer is. An id ahead of
        the stream delivers only later ids.
        """
        pos = self._base + self._index_after(last_event_id)
        sub = Subscription(self, pos, last_event_id, on_cut)
        if not (self.finished and pos >= self._end):
            self._subscribers.add(sub)
            self._min_pos_hint = min(self._min_pos_hint, pos)
        return sub

    def events_after(self, last_event_id: int) -> list[Event]:
        """A snapshot of the buffered events whose id is greater than ``last_event_id``."""
        return self._log[self._index_after(last_event_id) :]

    def _index_after(self, last_event_id: int) -> int:
        return bisect.bisect_right(self._log, last_event_id, key=_event_id)

    def _events_from(self, pos: int) -> list[Event]:
        return self._log[pos - self._base :]

    def _wait_for_news(self, timeout: float | None) -> None:
        news = self._news
        if news is None:
            news = self._news = gevent.event.Event()
        news.wait(timeout)

    def _cut_laggards(self) -> None:
        """Cut every subscriber more than ``client_queue`` events behind; refresh the hint."""
        limit = self._end - self.client_queue
        low = self._end
        for sub in list(self._subscribers):
            if sub._pos < limit:
                sub.cut = True
                self._subscribers.discard(sub)
                if not sub._waiting and sub.on_cut is not None:
                    try:
                        sub.on_cut()
                    except Exception:
                        log.exception("stream %s: on_cut failed", self.id)
                log.info(
                    "stream %s: cut a subscriber %d events behind (limit %d)",
                    self.id,
                    self._end - sub._pos,
                    self.client_queue,
                )
            elif sub._pos < low:
                low = sub._pos
        self._min_pos_hint = low
        # Wake the cut subscribers (if they are waiting) so that their responses end now.
        news = self._news
        if news is not None:
            self._news = None
            news.set()


class StreamRegistry:
    """Finds streams by id, limits how many run at once, forgets finished ones after a while."""

    def __init__(self, *, max_streams: int = 1000, retention: float = 300.0) -> None:
        self.max_streams = max_streams
        self.retention = retention
        self._streams: dict[str, Stream] = {}
        self._running = 0

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def running(self) -> int:
        return self._running

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def create(
        self,
        producer: Producer,
        input: Mapping[str, Any] | None = None,
        *,
        start: bool = True,
        on_complete: Callable[[Stream], None] | None = None,
        **options: Any,
    ) -> Stream:
        """Create (and by default start) a stream; raise :class:`StreamLimitReached` if full."""
        if self._running >= self.max_streams:
            raise StreamLimitReached(
                f"{self._running} streams are running (limit {self.max_streams})"
            )

        def completed(stream: Stream) -> None:
            self._running -= 1
            gevent.spawn_later(self.retention, self._forget, stream)
            if on_complete is not None:
                on_complete(stream)

        stream = Stream(producer, input, on_complete=completed, **options)
        self._streams[stream.id] = stream
        self._running += 1
        if start:
            stream.start()
        return stream

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    def cancel_all(self, reason: str | None = None) -> int:
        """Cancel every running stream (shutdown); return how many were running."""
        return sum(s.cancel(reason) for s in list(self._streams.values()))
