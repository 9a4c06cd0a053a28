"""The stream engine: producers, the live buffer, fan-out and resume. Imports no Flask.

One :class:`Stream` per producer run. The producer runs on its own greenlet and appends events to
the stream's live buffer, an append-only log of :class:`Event` objects whose integer ids strictly
increase. Every event is encoded once, when it is sent, and shared by all subscribers.

A :class:`Subscription` is a cursor into that log, not a queue: the producer never copies an event
per subscriber, and a subscriber that wakes up takes everything it has pending in one batch (one
write to its socket). A subscriber that falls more than ``client_queue`` events behind is *cut*: it
stops being a subscriber, its response ends, and the client resumes with ``Last-Event-ID``.
Nothing is ever dropped for a subscriber that stays.

Persistence (two tiers): block events (``block_start``, ``text_delta``, ``block_end``) are
aggregated per block as they arrive, and replayable app events kept, by a
:class:`~sse_blueprint._turn.TurnBuilder`. A persister greenlet per stream writes the blocks that
changed, the new events and the stream record to a :class:`~sse_blueprint.BlockStore` when a
block ends, when more than ``buffer_size`` events are unsaved, and at the end. It notes the last
event id *before* writing and, once the write succeeded, trims the live buffer only up to that
id (and never past a connected reader), so events sent while the write was in flight always
stay. A failed write keeps everything and is retried.
A reader whose position is older than the buffer gets the turn from the store, merged with the
buffer into one exact snapshot (:func:`~sse_blueprint._turn.catch_up`), then the live events.

Everything here runs on one OS thread under gevent. Greenlets switch only at blocking calls, so a
method that does not block is atomic: :meth:`Stream.subscribe` takes its snapshot and registers
the cursor without a lock, and no event can slip in between (see ARCHITECTURE.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.lock
from gevent import Greenlet

from . import _observe, _wire
from ._event import DURABLE, RESERVED_EVENTS, TERMINAL_EVENTS, Event
from ._records import BlockStore, StoredTurn, StreamRecord
from ._turn import TurnBuilder, catch_up

__all__ = [
    "Block",
    "Event",
    "Producer",
    "ProducerContext",
    "ProducerError",
    "Stream",
    "StreamClosed",
    "ShuttingDown",
    "StreamLimitReached",
    "StreamRegistry",
    "StreamState",
    "Subscription",
    "TERMINAL_EVENTS",
    "lost",
    "lost_data",
    "new_stream_id",
    "replay",
]

log = logging.getLogger("sse_blueprint")

#: A stream found "running" in the store with no live producer ends with an ``error`` event whose
#: id is this far past the last persisted id: past any event the lost producer could have sent.
LOST_ID_GAP = 1_000_000_000
PERSIST_RETRY_MIN = 0.1
PERSIST_RETRY_MAX = 5.0


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


class ShuttingDown(StreamLimitReached):
    """The registry is shutting down and starts no new stream."""


def new_stream_id() -> str:
    """A new stream id: 128 random bits, URL-safe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


class StreamBackend(Protocol):
    """Where a stream's events go besides this worker's memory (``RedisBackend``)."""

    def claim(self, stream: Stream) -> None:
        """Become the stream's one producer (before its first event)."""

    def append(self, stream: Stream, event: Event) -> None:
        """Write ``event`` for every worker, or raise :class:`StreamClosed` (ended elsewhere)."""

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        """Events up to ``up_to_id`` are in the store: the shared copy may drop them."""

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        """Share the stream's metadata (or raise :class:`StreamClosed`)."""


class SharedBackend(StreamBackend, Protocol):
    """What the registry needs of a backend shared between workers (``RedisBackend``)."""

    def mirror(self, stream_id: str) -> Stream | None:
        """This worker's follower of a stream run elsewhere, or None if unknown."""


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
        """The stream's metadata (a copy; change it with :meth:`set_metadata`)."""
        return dict(self._stream.metadata)

    def set_metadata(self, **values: Any) -> None:
        """Merge ``values`` (JSON) into the stream's metadata, shown by ``status`` everywhere."""
        self._stream._set_metadata(values)

    @property
    def cancelled(self) -> bool:
        """True once the stream is over (cancelled, timed out): stop producing."""
        return self._stream.finished

    def send(self, event: str, data: Mapping[str, Any], *, replay: str = DURABLE) -> int:
        """Append an app event to the stream and return its id.

        ``replay`` says what a client that resumes later gets: ``"durable"`` (the default) stores
        the event with the turn and replays it exactly once; ``"latest"`` keeps only the newest
        event of this name (progress, status); ``"ephemeral"`` is live only (a typing
        indicator). Raises :class:`StreamClosed` if the stream is already over, and
        ``ValueError`` for an event that cannot be sent (terminal names, CR/LF/NUL, data that is
        not JSON, more durable events than ``SSE_MAX_DURABLE_EVENTS``).
        """
        if event in RESERVED_EVENTS:
            raise ValueError(
                f"{event!r} is sent by the engine; return from the producer (done), raise "
                "ProducerError (error), or cancel the stream instead"
            )
        return self._stream._append(event, data, replay, check=True).id

    def block(self, kind: str = "text", meta: Mapping[str, Any] | None = None) -> Block:
        """Start the next block of the turn (numbered after every block so far): ``kind`` is
        ``text``, ``reasoning``, ``tool_call`` (meta ``name``, ``call_id``), ``tool_result``
        (meta ``call_id``) or your own, ``meta`` a JSON object. Sends ``block_start``.

        >>> def agent(ctx: ProducerContext) -> None:
        ...     with ctx.block("reasoning") as thinking:
        ...         thinking.write("The user wants the weather...")
        ...     call = ctx.block("tool_call", {"name": "weather", "call_id": "c1"})
        ...     call.write('{"city": "Paris"}')
        ...     call.end({"input": {"city": "Paris"}})
        ...     with ctx.block("tool_result", {"call_id": "c1"}) as result:
        ...         result.write('{"temp_c": 21}')
        ...     ctx.text(ctx.block().index, "It is 21 °C in Paris.")
        """
        index = self._stream._turn.next_block
        self._stream._append(
            "block_start", {"block": index, "kind": kind, "meta": dict(meta or {})}, check=True
        )
        return Block(self, index, kind)

    def text(self, block: int, text: str) -> int:
        """Send a ``text_delta``: append ``text`` to block ``block`` (a text block if new)."""
        return self._stream._append("text_delta", {"block": block, "text": text}, check=True).id

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once and raise :class:`StreamClosed` if the stream ends meanwhile.

        ``sleep(0)`` only lets the other greenlets run (readers then write what it sent so far).
        """
        stream = self._stream
        if seconds <= 0:
            gevent.sleep(0)
        elif stream._sleeper is None:
            # A plain sleep (a quarter of the cost of waiting on the closed event with a
            # timeout, paid on every token); the stream's end wakes it (see Stream._ended).
            stream._sleeper = gevent.getcurrent().throw
            try:
                if not stream._closed.is_set():
                    gevent.sleep(seconds)
            except _WakeUp:
                pass
            finally:
                stream._sleeper = None
        else:  # another greenlet of this producer is sleeping already
            stream._closed.wait(seconds)
        if stream._closed.is_set():
            raise StreamClosed(stream.id)

    def end_block(self, block: int, meta: Mapping[str, Any] | None = None) -> int:
        """End block ``block``: send ``block_end`` with ``meta`` (merged into the block's meta).

        The block is then complete, and persisted in the background. A ``tool_call`` block's
        end may carry the parsed arguments: ``ctx.end_block(i, {"input": json.loads(args)})``.
        """
        data = {"block": block, "meta": dict(meta or {})}
        return self._stream._append("block_end", data, check=True).id

    def snapshot(self) -> list[Event]:
        """The events in the live buffer now (oldest first)."""
        return list(self._stream._log)

    def trim(self, up_to_id: int) -> int:
        """Drop buffered events up to ``up_to_id``, for producers that persist their own way.

        Only call it once the stream's store can serve catch-up for those events. Events that a
        connected reader has not taken yet, and the newest event, stay. Returns how many went.
        """
        return self._stream._trim(up_to_id)


class Block:
    """A block a producer started with :meth:`ProducerContext.block`.

    Used as a context manager, it ends when the ``with`` body finishes without an exception.
    """

    __slots__ = ("_ctx", "ended", "index", "kind")

    def __init__(self, ctx: ProducerContext, index: int, kind: str) -> None:
        self._ctx = ctx
        self.index = index
        self.kind = kind
        self.ended = False

    def write(self, text: str) -> int:
        """Append ``text`` to the block's content (a ``text_delta``); returns the event id."""
        return self._ctx.text(self.index, text)

    def end(self, meta: Mapping[str, Any] | None = None) -> int:
        """End the block (``block_end``), merging ``meta`` into its meta."""
        event_id = self._ctx.end_block(self.index, meta)
        self.ended = True
        return event_id

    def __enter__(self) -> Block:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None and not self.ended:
            self.end()

    def __repr__(self) -> str:
        return f"Block(index={self.index}, kind={self.kind!r})"


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

    ``direct``, when the web layer sets it, writes events to the client without blocking and
    returns True if all of it went out. While such a subscriber waits in :meth:`poll`, the
    stream delivers its new events through ``direct`` from one greenlet for all of them, and
    wakes the subscriber only when that is not enough (a partial or failed write, the end, a
    cut). That spares a greenlet switch and the server's write path per event per client.
    """

    __slots__ = (
        "_after", "_catchup", "_pos", "_stream", "_waiting", "_wakeup", "closed", "cut",
        "direct", "on_cut", "writing_since",
    )  # fmt: skip

    def __init__(
        self, stream: Stream, pos: int, after: int, on_cut: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._pos = pos  # absolute index in the stream's log of the next event to deliver
        self._after = after  # deliver only ids greater than this (the client's Last-Event-ID)
        self._catchup = False  # True: the buffer no longer covers ``after``; ask the store first
        self._waiting = False
        self.cut = False
        self.closed = False
        self.on_cut = on_cut
        self.writing_since = 0.0  # when the web layer began a write still under way (0: none)
        self.direct: Callable[[list[Event]], bool] | None = None
        self._wakeup: gevent.event.Event | None = None  # what a direct subscriber waits on

    @property
    def stream_id(self) -> str:
        return self._stream.id

    @property
    def from_store(self) -> bool:
        """The buffer no longer covers the position: the first :meth:`poll` reads the store."""
        return self._catchup

    @property
    def lag(self) -> int:
        """Events appended but not yet taken by this subscriber."""
        return self._stream._visible - self._pos

    @property
    def done(self) -> bool:
        """Nothing more will come: cut, closed, or the stream ended and all of it was taken."""
        return self.cut or self.closed or (self._stream.finished and self._pos >= self._stream._end)

    def poll(self, timeout: float | None) -> list[Event]:
        """Return pending events, waiting up to ``timeout`` seconds for some."""
        stream = self._stream
        if self._catchup:
            self._catchup = False
            return stream._catch_up(self)
        if self._pos >= stream._visible and not self.done:
            self._waiting = True
            try:
                if self.direct is None:
                    stream._wait_for_news(timeout)
                else:
                    stream._park(self, timeout)
            finally:
                self._waiting = False
        if self.cut or self.closed:
            return []
        return self._take()

    def _take(self) -> list[Event]:
        """The pending events, marked as delivered."""
        events = self._stream._events_from(self._pos)
        self._pos += len(events)
        if events and events[0].id <= self._after:
            # Only for a Last-Event-ID ahead of the stream: skip what the client claims to have.
            events = [e for e in events if e.id > self._after]
        return events

    def close(self) -> None:
        """Stop following the stream. Idempotent."""
        if not self.closed:
            self.closed = True
            stream = self._stream
            stream._subscribers.discard(self)
            if stream._trim_to > stream._trimmed_id:
                stream._trim(stream._trim_to)  # this reader may have been holding it back


class _WakeUp(Exception):
    """Thrown into a producer asleep in :meth:`ProducerContext.sleep` when its stream ends."""


#: Seconds a fan-out runs before it lets other greenlets run.
FAN_OUT_SLICE = 0.02
#: At most this many parked readers are written to from the wake-up itself, without a
#: fan-out greenlet (a few dozen non-blocking sends take well under a millisecond).
FAN_OUT_INLINE = 16


class Stream:
    """One producer run and its live buffer. See the module docstring.

    Construct through :meth:`StreamRegistry.create`; call :meth:`start` to run the producer.
    With a ``store``, blocks are persisted and the buffer is trimmed (see the module docstring);
    without one the buffer keeps every event until the stream is forgotten.
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
        buffer_size: int = 1024,
        store: BlockStore | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_complete: Callable[[Stream], None] | None = None,
        backend: StreamBackend | None = None,
        mirror: bool = False,
        max_event_bytes: int = 1 << 20,
        durable: bool = False,
        max_meta_bytes: int = 65536,
        max_replayed_events: int = 1000,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.max_event_bytes = max_event_bytes
        self.producer_name = producer_name
        self.input: Mapping[str, Any] = input or {}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.state = StreamState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.client_queue = client_queue
        self.buffer_size = buffer_size
        self.timeout = timeout
        self._producer = producer
        self._on_complete = on_complete
        self._greenlet: Greenlet | None = None
        self._timer: Greenlet | None = None
        self._closed = gevent.event.Event()  # set when the terminal event is in the log
        # The producer while in ctx.sleep: how to wake it (its greenlet's throw).
        self._sleeper: Callable[[type[BaseException]], object] | None = None
        # The live buffer: _log[i] has absolute index _base + i; _end = _base + len(_log).
        self._log: list[Event] = []
        self._base = 0
        self._end = 0
        # Readers see the log up to here (absolute index): its end, or in durable delivery
        # (``SSE_DELIVERY = "durable"``) only as far as the store has it.
        self._visible = 0
        self._last_id = 0
        self._subscribers: set[Subscription] = set()
        # Lower bound of every subscriber's position, refreshed when a lag scan runs.
        self._min_pos_hint = 0
        self._news: gevent.event.Event | None = None
        self._parked: set[Subscription] = set()  # direct subscribers waiting in poll
        self._fanning_out = False  # a fan-out to the parked subscribers is scheduled or running
        self._fan_again = False  # news came while a fan-out paused: it makes another pass
        self._wake_pending = False
        self._wake_timer: Any = None  # a libev timer, made on first use
        self.start_event: Event | None = None
        self.terminal_event: Event | None = None
        # Persistence.
        self._store = store
        self._turn = TurnBuilder(max_meta_bytes=max_meta_bytes, max_events=max_replayed_events)
        self._persisted_id = 0  # every event up to this id is covered by the store
        self._persisted_pos = 0  # absolute log index just past _persisted_id
        self._trimmed_id = 0  # id of the newest event dropped from the buffer (0: none)
        self._trim_to = 0  # trim up to here once no reader holds the events back
        self._flush_wanted = gevent.event.Event()
        self._persister: Greenlet | None = None
        self.saved = gevent.event.Event()  # set once the store holds the whole finished stream
        self.persist_failures = 0
        # A shared backend (Redis) sees every event first; a mirror only follows another
        # worker's stream (no producer, no writes) for this worker's readers.
        self._backend = backend
        self._append_lock = gevent.lock.Semaphore()
        self.mirror = mirror
        self._writes = store is not None and not mirror
        self._durable = durable and self._writes
        if not self._writes:
            self.saved.set()

    # -- producer side -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the producer on its own greenlet (once)."""
        if self._greenlet is not None or self.mirror:
            raise RuntimeError("stream already started" if not self.mirror else "a mirror")
        if self._backend is not None:
            self._backend.claim(self)
        self.start_event = self._append(
            "start", {"stream_id": self.id, "producer": self.producer_name}
        )
        self._request_flush()  # the record exists in the store from the start
        self._greenlet = gevent.spawn(self._run)
        _observe.METRICS.stream_started(self.producer_name)
        if self.timeout:
            self._timer = gevent.spawn_later(self.timeout, self._expire)

    def _run(self) -> None:
        _observe.current_stream.set(self.id)
        ctx = ProducerContext(self, self.input)
        try:
            result: object = self._producer(ctx)
        except StreamClosed:
            pass  # cancelled or timed out: the terminal event is already there
        except ProducerError as exc:
            _observe.METRICS.producer_error(self.producer_name)
            self._finish(StreamState.ERROR, {"message": str(exc) or "producer failed"})
        except Exception:
            _observe.METRICS.producer_error(self.producer_name)
            log.exception(
                "producer %r of stream %s failed",
                self.producer_name,
                self.id,
                extra={"stream_id": self.id},
            )
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
            if not self.finished:
                self._end_here("producer stopped")

    def _end_here(self, message: str) -> None:
        """The last resort when no end can be written (a backend that keeps refusing): end the
        stream in this process anyway. With Redis, this worker stops renewing its lease, so the
        other workers' watchdogs end it there once the lease lapses ("producer lost")."""
        log.error(
            "stream %s: its end could not be written; ending it here",
            self.id,
            extra={"stream_id": self.id},
        )
        data = {"stream_id": self.id, "message": message}
        self._adopt_terminal(Event(self._last_id + 1, StreamState.ERROR.value, data))

    def _expire(self) -> None:
        self._timer = None
        self.stop("stream timed out")

    def stop(self, message: str = "producer stopped") -> bool:
        """End the stream with ``error`` (``message``) and stop its producer.

        Used for timeouts and at shutdown. False if it had already ended.
        """
        if not self._finish(StreamState.ERROR, {"message": message}):
            return False
        self._stop_producer()
        return True

    def cancel(self, reason: str | None = None) -> bool:
        """End the stream with ``cancelled`` and stop its producer. False if it had ended."""
        data: dict[str, Any] = {"reason": reason} if reason else {}
        if not self._finish(StreamState.CANCELLED, data):
            return False
        self._stop_producer()
        return True

    def _stop_producer(self) -> None:
        g = self._greenlet
        # Raised where the producer blocks (sleep, I/O); its ``finally`` blocks run. One that has
        # not begun (cancelled at once) is left to begin: its first send or sleep raises
        # StreamClosed, so its own clean-up runs too.
        begun = g is not None and g.gr_frame is not None
        if g is not None and begun and not g.dead and g is not gevent.getcurrent():
            g.kill(StreamClosed(self.id), block=False)

    def _append(
        self, event: str, data: Mapping[str, Any], replay: str = DURABLE, *, check: bool = False
    ) -> Event:
        """Number an event and put it in the stream; ``check``: the producer's, not the engine's
        (the turn checks it first)."""
        if self._backend is None:
            return self._append_now(event, data, replay, check)  # no blocking call: atomic
        # The backend's write blocks, and a cancel or a timeout may append meanwhile from
        # another greenlet: one append at a time, or two events would get the same id.
        with self._append_lock:
            return self._append_now(event, data, replay, check)

    def _append_now(self, event: str, data: Mapping[str, Any], replay: str, check: bool) -> Event:
        if self.terminal_event is not None:
            raise StreamClosed(self.id)
        ev = Event(self._last_id + 1, event, data, replay)  # (refuses data that is not JSON)
        if check:
            self._turn.check(event, data, replay)
        if len(ev.sse) > self.max_event_bytes:
            raise ValueError(
                f"event {event!r} is {len(ev.sse)} bytes, more than max_event_bytes "
                f"({self.max_event_bytes}); split it into several events"
            )
        if self._backend is not None:
            self._backend.append(self, ev)  # raises StreamClosed if it ended elsewhere
        self._log_append(ev)
        _observe.METRICS.event()
        return ev

    def _log_append(self, ev: Event) -> None:
        """Put an event (already numbered) in the live buffer and wake the readers."""
        self._last_id = ev.id
        self._log.append(ev)
        self._end += 1
        durable = self._durable
        if ev.id == 1 and self.start_event is None:
            self.start_event = ev  # a mirror's: the owner's is set when it starts
        if not self.mirror:
            ended_block = self._turn.apply(ev)
            if ended_block or self._end - self._persisted_pos > self.buffer_size:
                self._request_flush()
        if durable:
            self._request_flush()  # readers see it once it is written (see _reveal)
        else:
            self._reveal(self._end)

    def _reveal(self, pos: int) -> None:
        """Readers may now take the log up to ``pos``: wake them (on the loop's next turn)."""
        self._visible = pos
        if pos - self._min_pos_hint > self.client_queue:
            self._cut_laggards()
        if (self._news is not None or self._parked) and not self._wake_pending:
            # Readers wake on the event loop's next turn, not now: a producer that appends
            # several events before it really waits (a burst, a block at once) gets them all
            # written in one write per reader instead of one write per event.
            self._wake_pending = True
            timer = self._wake_timer
            if timer is None:
                timer = self._wake_timer = gevent.get_hub().loop.timer(0.0)
            timer.start(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        self._notify()

    def _notify(self) -> None:
        """Wake every waiting reader now (parked ones through a fan-out)."""
        news = self._news
        if news is not None:
            self._news = None
            news.set()
        if self._parked:
            if self._fanning_out:
                self._fan_again = True
            elif len(self._parked) <= FAN_OUT_INLINE:
                # A few readers (the chat shape): write to them right here. Their writes never
                # block, and a greenlet per wake-up would cost more than the writes.
                self._fan_out_once(inline=True)
            else:
                self._fanning_out = True
                gevent.spawn_raw(self._fan_out)

    def _park(self, sub: Subscription, timeout: float | None) -> None:
        """Wait in :meth:`Subscription.poll` while the fan-out delivers ``sub``'s events."""
        wakeup = sub._wakeup
        if wakeup is None:
            wakeup = sub._wakeup = gevent.event.Event()
        else:
            wakeup.clear()
        self._parked.add(sub)
        try:
            wakeup.wait(timeout)
        finally:
            # Before anything else runs: from here on only this greenlet writes to the client.
            self._parked.discard(sub)

    def _fan_out(self) -> None:
        """Deliver new events to every parked subscriber; wake those it cannot serve."""
        try:
            self._fan_again = True
            while self._fan_again:
                self._fan_again = False
                self._fan_out_once()
        finally:
            self._fanning_out = False

    def _fan_out_once(self, inline: bool = False) -> None:
        # A parked subscriber's connection belongs to this loop until the subscriber is woken
        # (and unparked) or its wait times out, which it can only do while this loop pauses:
        # hence the membership check. The pause lets the rest of the worker run when a round
        # is long (many clients, big events); ``inline`` (a few readers, maybe in the hub's own
        # callback) never pauses.
        parked = self._parked
        clock = time.perf_counter
        began = clock()
        for i, sub in enumerate(list(parked)):
            if i & 63 == 63 and not inline and clock() - began > FAN_OUT_SLICE:
                gevent.sleep(0)
                began = clock()
            if sub not in parked:
                continue
            try:
                if not (sub.cut or sub.closed) and sub._pos < self._visible:
                    events = sub._take()
                    if events and not sub.direct(events):  # type: ignore[misc]
                        self._unpark(sub)  # its greenlet finishes the write, or ends
                        continue
                if sub.done:
                    self._unpark(sub)
            except Exception as exc:
                # (Logged from a greenlet of its own: a log handler may block, the hub may not.)
                gevent.spawn_raw(
                    log.error,
                    "stream %s: direct write failed",
                    self.id,
                    exc_info=exc,
                    extra={"stream_id": self.id},
                )
                sub.cut = True  # the client resumes from its last id
                self._subscribers.discard(sub)
                self._unpark(sub)

    def _unpark(self, sub: Subscription) -> None:
        self._parked.discard(sub)
        if sub._wakeup is not None:
            sub._wakeup.set()

    def _set_metadata(self, values: Mapping[str, Any]) -> None:
        if self.terminal_event is not None:
            raise StreamClosed(self.id)
        merged = {**self.metadata, **values}
        _wire.dumps(merged)  # JSON or ValueError/TypeError, before anything changes
        if self._backend is not None:
            self._backend.set_metadata(self, merged)
        self.metadata = merged
        self._request_flush()

    def _ingest(self, ev: Event) -> None:
        """A mirror's feed: an event written by the owner (on another worker)."""
        if ev.id <= self._last_id or self.terminal_event is not None:
            return
        self._log_append(ev)
        if ev.terminal:
            self._ended(ev)

    def _adopt_terminal(self, ev: Event) -> None:
        """The owner learns that its stream ended elsewhere (a cancel, a lease lost)."""
        if self.terminal_event is not None or ev.id <= self._last_id:
            return
        if ev.id > self._last_id + 1:
            # Our own appends before it are still on their way back: take it after them.
            gevent.spawn_later(0.005, self._adopt_terminal, ev)
            return
        self._log_append(ev)
        self._ended(ev)
        self._stop_producer()

    def _finish(self, state: StreamState, data: Mapping[str, Any]) -> bool:
        if self.terminal_event is not None:
            return False
        try:
            ev = self._append(state.value, {"stream_id": self.id, **data})
        except StreamClosed:
            return False  # it ended elsewhere first (the backend adopted that terminal event)
        self._ended(ev)
        return True

    def _wake_sleeper(self) -> None:
        # (In the hub.) Still asleep in ctx.sleep: end that sleep; it raises StreamClosed.
        sleeper = self._sleeper
        if sleeper is not None:
            sleeper(_WakeUp)

    def _ended(self, ev: Event) -> None:
        """Bookkeeping once the terminal event ``ev`` is in the buffer."""
        self.terminal_event = ev
        self.state = StreamState(ev.event)
        self.finished_at = time.time()
        self._closed.set()
        if self._sleeper is not None:  # the producer, in ctx.sleep: wake it now
            gevent.get_hub().loop.run_callback(self._wake_sleeper)
        self._request_flush()
        if self._greenlet is not None:
            _observe.METRICS.stream_finished(self.producer_name, ev.event)
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        if self._on_complete is not None:
            try:
                self._on_complete(self)
            except Exception:
                log.exception(
                    "on_complete hook of stream %s failed", self.id, extra={"stream_id": self.id}
                )

    # -- persistence ---------------------------------------------------------------------------

    def record(self) -> StreamRecord:
        """The stream's durable state now."""
        terminal = self.terminal_event
        return StreamRecord(
            stream_id=self.id,
            producer=self.producer_name,
            state=self.state.value,
            last_event_id=self._last_id,
            created_at=self.created_at,
            metadata=self.metadata,
            finished_at=self.finished_at,
            terminal=terminal.event if terminal else None,
            terminal_id=terminal.id if terminal else None,
            terminal_data=terminal.data if terminal else None,
        )

    def _request_flush(self) -> None:
        if not self._writes:
            return
        self._flush_wanted.set()
        if self._persister is None or self._persister.dead:
            self._persister = gevent.spawn(self._persist_loop)

    def _persist_loop(self) -> None:
        """Write what changed, then trim; on failure keep everything and retry with backoff."""
        store = self._store
        assert store is not None
        _observe.current_stream.set(self.id)
        delay = PERSIST_RETRY_MIN
        while True:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            # Snapshot (no blocking call until the write): everything up to last_id is in it.
            end_pos, last_id = self._end, self._last_id
            record = self.record()
            blocks, events = self._turn.unsaved(self.id)
            began = time.perf_counter()
            try:
                store.save(record, blocks, events)
            except Exception as exc:
                self.persist_failures += 1
                _observe.METRICS.persist_failed()
                log.warning(
                    "stream %s: persisting %d block(s) failed (%s); retrying in %.1fs, the "
                    "buffer keeps every event meanwhile",
                    self.id,
                    len(blocks),
                    exc,
                    delay,
                    extra={"stream_id": self.id},
                )
                self._flush_wanted.set()
                gevent.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY_MAX)
                continue
            _observe.METRICS.persisted(time.perf_counter() - began)
            delay = PERSIST_RETRY_MIN
            self._turn.saved(blocks, events)
            if last_id > self._persisted_id:
                self._persisted_id, self._persisted_pos = last_id, end_pos
                if self._durable:
                    self._reveal(end_pos)
            if blocks or events or len(self._log) > self.buffer_size:
                # (A write of the record alone trims nothing: that would only send new readers
                # to the store for the ``start`` event.)
                self._trim_to = self._persisted_id
                self._trim(self._trim_to)
                if self._backend is not None:
                    self._backend.persisted(self, self._persisted_id)
            if self.finished and self._persisted_id >= self._last_id:
                if not self.saved.is_set():
                    log.debug("stream %s: saved", self.id, extra={"stream_id": self.id})
                self.saved.set()
                if not self._flush_wanted.is_set():
                    return

    def _trim(self, up_to_id: int) -> int:
        """Drop buffered events with id <= ``up_to_id``, sparing unread events and the newest."""
        keep_from = self._end - 1  # the newest event always stays (a finished stream's terminal)
        for sub in self._subscribers:
            keep_from = min(keep_from, sub._pos)
        count = min(self._index_after(up_to_id), keep_from - self._base)
        if count <= 0:
            return 0
        self._trimmed_id = self._log[count - 1].id
        del self._log[:count]
        self._base += count
        self._min_pos_hint = max(self._min_pos_hint, self._base)
        return count

    def _catch_up(self, sub: Subscription) -> list[Event]:
        """The turn from the store merged with the buffer: an exact snapshot, then live events.

        ``sub`` was registered at the start of the buffer, which pins it (nothing after that is
        trimmed) while the store is read. Every event the store does not cover is newer than
        what was trimmed, so it is in the pinned buffer. The merge below does not block, so the
        snapshot and the switch to live events are one step.
        """
        after = sub._after
        store = self._store
        assert store is not None
        try:
            stored = store.load_turn(self.id, after)
        except Exception as exc:
            log.warning(
                "stream %s: catch-up from the store failed (%s); cutting reader",
                self.id,
                exc,
                extra={"stream_id": self.id},
            )
            sub.cut = True
            self._subscribers.discard(sub)
            return []
        if sub.done:
            return []
        out = catch_up(stored, self._log[sub._pos - self._base : self._visible - self._base], after)
        start = self.start_event
        if start is not None and after < start.id <= self._trimmed_id:
            out.insert(0, start)
        # The store may hold more than readers were shown (durable delivery: a write committed,
        # its writer not yet resumed): this reader then goes on after what the snapshot covers.
        covered = max((e.id for e in out), default=0)
        sub._pos = max(self._visible, self._base + self._index_after(covered))
        return out

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

    @property
    def buffered(self) -> int:
        """Events in the live buffer now."""
        return len(self._log)

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
        the stream delivers only later ids. An id older than the buffer is caught up from the
        store on the first :meth:`Subscription.poll`.
        """
        if last_event_id < self._trimmed_id:
            sub = Subscription(self, self._base, last_event_id, on_cut)
            sub._catchup = True
            _observe.METRICS.catch_up("database")
        else:
            _observe.METRICS.catch_up("buffer")
            sub = Subscription(
                self, self._base + self._index_after(last_event_id), last_event_id, on_cut
            )
        if not (self.finished and sub._pos >= self._end and not sub._catchup):
            self._subscribers.add(sub)
            self._min_pos_hint = min(self._min_pos_hint, sub._pos)
        return sub

    def _index_after(self, last_event_id: int) -> int:
        return bisect.bisect_right(self._log, last_event_id, key=_event_id)

    def _events_from(self, pos: int) -> list[Event]:
        return self._log[pos - self._base : self._visible - self._base]

    def _wait_for_news(self, timeout: float | None) -> None:
        news = self._news
        if news is None:
            news = self._news = gevent.event.Event()
        news.wait(timeout)

    def release_readers(self, *, only_writing: bool = False) -> int:
        """End readers' responses now (shutdown): each resumes from its last id elsewhere.

        With ``only_writing``, only readers stuck in a write (``writing_since`` set) are
        released; the others take what they have pending and end by themselves. Returns how
        many readers were released.
        """
        subs = [s for s in self._subscribers if s.writing_since or not only_writing]
        if not subs:
            return 0
        for sub in subs:
            sub.cut = True
            self._subscribers.discard(sub)
        self._notify()
        if self._trim_to > self._trimmed_id:
            self._trim(self._trim_to)
        return len(subs)

    def _cut_laggards(self) -> None:
        """Cut every subscriber more than ``client_queue`` events behind; refresh the hint."""
        limit = self._visible - self.client_queue
        low = self._visible
        for sub in list(self._subscribers):
            if sub._pos < limit:
                sub.cut = True
                self._subscribers.discard(sub)
                _observe.METRICS.cut()
                if not sub._waiting and sub.on_cut is not None:
                    try:
                        sub.on_cut()
                    except Exception:
                        log.exception(
                            "stream %s: on_cut failed", self.id, extra={"stream_id": self.id}
                        )
                log.info(
                    "stream %s: cut a subscriber %d events behind (limit %d)",
                    self.id,
                    self._visible - sub._pos,
                    self.client_queue,
                    extra={"stream_id": self.id},
                )
            elif sub._pos < low:
                low = sub._pos
        self._min_pos_hint = low
        # Wake the cut subscribers (if they are waiting) so that their responses end now.
        self._notify()


def replay(record: StreamRecord, stored: StoredTurn, after: int) -> list[Event]:
    """The catch-up of a stream that lives only in the store: start, the turn, terminal event."""
    out = catch_up(stored, (), after)
    if after < 1:
        out.insert(
            0, Event(1, "start", {"stream_id": record.stream_id, "producer": record.producer})
        )
    if record.terminal and record.terminal_id is not None and record.terminal_id > after:
        out.append(Event(record.terminal_id, record.terminal, record.terminal_data or {}))
    return out


def lost_data(stream_id: str, message: str = "producer lost") -> dict[str, Any]:
    """The data of the ``error`` event that ends a stream whose producer (or its state) is gone."""
    return {"stream_id": stream_id, "message": message}


def lost(record: StreamRecord) -> StreamRecord:
    """The record of a stream whose producer is gone: ended with ``error: producer lost``."""
    terminal_id = record.last_event_id + LOST_ID_GAP
    return dataclasses.replace(
        record,
        state=StreamState.ERROR.value,
        last_event_id=terminal_id,
        finished_at=time.time(),
        terminal="error",
        terminal_id=terminal_id,
        terminal_data=lost_data(record.stream_id),
    )


class StreamRegistry:
    """Finds streams by id, limits how many run at once, forgets finished ones after a while.

    With a ``store``, a stream that is not in memory (finished and forgotten, or from before a
    restart) is found in the store: :meth:`find` returns its :class:`StreamRecord`.
    """

    def __init__(
        self,
        *,
        max_streams: int = 1000,
        retention: float = 300.0,
        store: BlockStore | None = None,
        backend: SharedBackend | None = None,
    ) -> None:
        self.max_streams = max_streams
        self.retention = retention
        self.store = store
        self.backend = backend
        self._streams: dict[str, Stream] = {}
        self._running = 0
        self.closing = False  # set by shutdown(): no new streams

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def running(self) -> int:
        return self._running

    def get(self, stream_id: str) -> Stream | None:
        """The live (in-memory) stream with this id, or None."""
        return self._streams.get(stream_id)

    def find(self, stream_id: str) -> Stream | StreamRecord | None:
        """The live stream, else its record from the store, else None.

        A record still "running" here has no producer left (this backend runs producers only in
        this process): it is ended with ``error: producer lost`` in the store, first writer wins.
        """
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if self.backend is not None:
            mirror = self.backend.mirror(stream_id)  # run by another worker or instance
            if mirror is not None:
                return mirror
        if self.store is None:
            return None
        record = self.store.load_stream(stream_id)
        if record is None or record.state != StreamState.RUNNING.value:
            return record
        log.warning(
            "stream %s: no producer runs it any more; ending it as lost",
            stream_id,
            extra={"stream_id": stream_id},
        )
        self.store.save(lost(record), [])
        return self.store.load_stream(stream_id)

    def replay(self, record: StreamRecord, after: int) -> list[Event]:
        """The events a reader at ``after`` gets from a stream that lives only in the store."""
        assert self.store is not None
        return replay(record, self.store.load_turn(record.stream_id, after), after)

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
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self._running >= self.max_streams:
            raise StreamLimitReached(
                f"{self._running} streams are running (limit {self.max_streams})"
            )

        def completed(stream: Stream) -> None:
            self._running -= 1
            gevent.spawn_later(self.retention, self._forget, stream)
            if on_complete is not None:
                on_complete(stream)

        stream = Stream(
            producer,
            input,
            on_complete=completed,
            store=self.store,
            backend=self.backend,
            **options,
        )
        self._streams[stream.id] = stream
        self._running += 1
        if start:
            try:
                stream.start()
            except BaseException:
                self._running -= 1
                del self._streams[stream.id]
                raise
        return stream

    def _forget(self, stream: Stream) -> None:
        if not stream.saved.is_set():
            # The store does not have all of it yet: keep serving it from memory meanwhile.
            gevent.spawn_later(max(self.retention, 1.0), self._forget, stream)
            return
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    def cancel_all(self, reason: str | None = None) -> int:
        """Cancel every running stream; return how many were running."""
        return sum(s.cancel(reason) for s in list(self._streams.values()))

    def shutdown(
        self, grace: float, *, handover: bool, save_timeout: float = 5.0
    ) -> tuple[int, int]:
        """Stop serving, for a worker that is about to exit. Returns (finished, stopped).

        No new stream starts. With ``handover`` (another worker can serve these streams: a shared
        backend) every reader is released at once and resumes elsewhere from its last id;
        without it readers stay and see their stream end here. Producers get ``grace`` seconds
        to finish; those still running are then stopped with ``error: server shutting down``.
        Then everything is persisted (up to ``save_timeout`` more seconds), readers get 2 s
        to take their last events, and any still stuck writing are released.
        """
        self.closing = True
        streams = list(self._streams.values())
        if handover:
            for stream in streams:
                stream.release_readers()
        deadline = time.monotonic() + grace
        running = [s for s in streams if not s.finished]
        for stream in running:
            stream.wait(max(0.0, deadline - time.monotonic()))
        stopped = sum(s.stop("server shutting down") for s in running)
        deadline = time.monotonic() + save_timeout
        for stream in streams:
            if not stream.saved.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "stream %s: not fully persisted at shutdown (the store is unreachable)",
                    stream.id,
                    extra={"stream_id": stream.id},
                )
        # Readers take what they have pending (the terminal event); the few still stuck writing
        # to a slow client after two seconds are released (they resume from their last id).
        # A reader that is not writing (one that subscribed a moment ago, say) is left to take
        # its events: releasing it would end its response before it had any.
        deadline = time.monotonic() + 2.0
        while any(s.subscriber_count for s in streams) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for stream in streams:
            stream.release_readers(only_writing=True)
        return len(running) - stopped, stopped
