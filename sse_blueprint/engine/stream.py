"""One producer run (:class:`Stream`): the parts of the engine composed, and the one way a stream
ends. Imports the engine's parts, the records and gevent; no Flask, no backend, no store.

The producer runs on its own greenlet (:class:`~.producer.ProducerRun`) and appends events to the
stream's live buffer (:class:`~.log.EventLog`), an append-only log of :class:`Event` objects
whose integer ids strictly increase. Every event is encoded once and shared by all readers.

A reader is a cursor into that log (:class:`~.subscription.Subscription`), not a queue; the
reader set (:class:`~.readers.Readers`) wakes them, fans out, and cuts one that falls more than
``client_queue`` events behind (its response ends; the client resumes with ``Last-Event-ID``).
Nothing is ever dropped for a reader that stays.

Persistence (two tiers): the turn's blocks and replayable events are aggregated as they arrive
(:class:`~.turn.TurnBuilder`), and the :class:`~.persister.Persister` writes what changed when a
block ends, when more than ``buffer_size`` events are unsaved, and at the end. It notes the last
event id *before* writing and, once the write succeeded, the buffer is trimmed only up to that id
(and never past a connected reader), so events sent while the write was in flight always stay.
A reader whose position is older than the buffer gets the turn from the store merged with the
buffer into one exact snapshot (:func:`~.turn.catch_up`), then the live events.

Every append and every end goes through the stream's :class:`~.writer.Writer`: an end this
process writes (the producer's return or failure, a cancel, a timeout, shutdown) through
:meth:`Stream.end`, an end written elsewhere through :meth:`Stream.adopt_end`.

Everything here runs on one OS thread under gevent. Greenlets switch only at blocking calls, so a
method that does not block is atomic: :meth:`Stream.subscribe` takes its snapshot and registers
the cursor without a lock, and no event can slip in between (see ARCHITECTURE.md).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
import gevent.event

from .. import _observe, _wire
from .._event import DURABLE, Event
from ..storage.records import BlockStore
from .context import Producer
from .lifecycle import StreamClosed, StreamState
from .log import EventLog
from .persister import Persister
from .ports import StreamBackend
from .producer import ProducerRun
from .readers import Readers
from .subscription import Subscription
from .turn import TurnBuilder
from .writer import Writer

__all__ = ["Stream", "new_stream_id"]


def new_stream_id() -> str:
    """A new stream id: 128 random bits, URL-safe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


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
        max_event_bytes: int = 1 << 20,
        durable: bool = False,
        max_meta_bytes: int = 65536,
        max_replayed_events: int = 1000,
    ) -> None:
        self.id = stream_id or new_stream_id()
        self.producer_name = producer_name
        self.input: Mapping[str, Any] = input or {}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.state = StreamState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.client_queue = client_queue
        self.buffer_size = buffer_size
        self.closed = gevent.event.Event()  # set when the terminal event is in the log
        self.producer = ProducerRun(self, producer, timeout, self.closed)
        self.buffer = EventLog()  # the live buffer: every reader is a cursor into it
        self.readers = Readers(self, client_queue)
        self.start_event: Event | None = None
        self.terminal_event: Event | None = None
        # The turn's blocks and replayed events, built from the events (the aggregator).
        self.turn = TurnBuilder(max_meta_bytes=max_meta_bytes, max_events=max_replayed_events)
        # Persistence: where the blocks are written, and readers older than the buffer caught
        # up from (a mirror's store is the owner's: it reads it, never writes).
        self.store = store
        self.saved = gevent.event.Event()  # set once the store holds the whole finished stream
        self._backend = backend
        self.writer = Writer(
            self, backend, max_event_bytes=max_event_bytes, on_complete=on_complete
        )
        self.persister = Persister(self, store, durable=durable) if store is not None else None
        if store is None:
            self.saved.set()

    # -- producer side -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the producer on its own greenlet (once)."""
        if self.producer.started:
            raise RuntimeError("stream already started")
        if self._backend is not None:
            self._backend.claim(self)
        self.start_event = self.append(
            "start", {"stream_id": self.id, "producer": self.producer_name}
        )
        self.request_flush()  # the record exists in the store from the start
        self.producer.start()
        _observe.METRICS.stream_started(self.producer_name)

    def stop(self, message: str = "producer stopped") -> bool:
        """End the stream with ``error`` (``message``) and stop its producer.

        Used for timeouts and at shutdown. False if it had already ended.
        """
        return self.end(StreamState.ERROR, {"message": message}, stop_producer=True)

    def cancel(self, reason: str | None = None) -> bool:
        """End the stream with ``cancelled`` and stop its producer. False if it had ended."""
        data: dict[str, Any] = {"reason": reason} if reason else {}
        return self.end(StreamState.CANCELLED, data, stop_producer=True)

    def end(
        self, state: StreamState, data: Mapping[str, Any], *, stop_producer: bool = False
    ) -> bool:
        """The one way this process ends its stream (the producer's return or failure, a cancel,
        a timeout, shutdown): append the terminal event, which every worker sees, and stop the
        producer if asked. False if the stream had ended, here or elsewhere (then the backend
        adopted that end: :meth:`adopt_end`)."""
        return self.writer.end(state, data, stop_producer=stop_producer)

    def append(
        self, event: str, data: Mapping[str, Any], replay: str = DURABLE, *, check: bool = False
    ) -> Event:
        """Number an event and put it in the stream.

        ``check``: the producer's own, through :class:`ProducerContext`. The turn's rules apply
        to it, and with a shared backend it is not waited for: it goes out with the others the
        producer writes before it pauses, and into the log once the backend has it (see
        :class:`~.outbox.Outbox`). Any other append waits for that.
        """
        return self.writer.append(event, data, replay, check=check)

    def reveal(self, pos: int) -> None:
        """Readers may now take the log up to ``pos``: wake them (on the loop's next turn)."""
        self.buffer.visible = pos
        self.readers.revealed(pos)

    def set_metadata(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` (JSON) into the metadata, for every worker and the store."""
        if self.terminal_event is not None:
            raise StreamClosed(self.id)
        merged = {**self.metadata, **values}
        _wire.dumps(merged)  # JSON or ValueError/TypeError, before anything changes
        if self._backend is not None:
            self._backend.set_metadata(self, merged)
        self.metadata = merged
        self.request_flush()

    # -- a backend's feed: the only methods a backend calls to change a stream (and Mirror's) --

    def adopt_end(self, ev: Event) -> None:
        """The owner learns that its stream ended elsewhere (a cancel, a lease lost): take that
        terminal event after its own appends and stop the producer."""
        self.writer.adopt_end(ev)

    def trim_persisted(self, up_to_id: int) -> None:
        """Everything up to ``up_to_id`` is in the store (a mirror: the owner says so): drop it
        from the buffer as soon as no reader still needs it."""
        self.readers.trim_persisted(up_to_id)

    # -- persistence ---------------------------------------------------------------------------

    def request_flush(self) -> None:
        if self.persister is not None:
            self.persister.request()

    def covered(self, up_to_id: int) -> None:
        """The store holds every event up to ``up_to_id`` (the persister says so): trim the
        buffer up to it and tell the backend."""
        self.trim_persisted(up_to_id)
        if self._backend is not None:
            self._backend.persisted(self, up_to_id)

    # -- reader side ---------------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """Seconds after its start when the stream is ended (``error: stream timed out``)."""
        return self.producer.timeout

    @property
    def finished(self) -> bool:
        return self.terminal_event is not None

    @property
    def last_event_id(self) -> int:
        return self.buffer.last_id

    @property
    def subscriber_count(self) -> int:
        return len(self.readers)

    @property
    def buffered(self) -> int:
        """Events in the live buffer now."""
        return len(self.buffer)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the stream has ended; True if it has."""
        return bool(self.closed.wait(timeout))

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
        return self.readers.subscribe(last_event_id, on_cut)

    def buffered_after(self, last_event_id: int) -> list[Event]:
        """The buffered events after ``last_event_id`` (for a backend that lost them)."""
        return self.buffer.after(last_event_id)

    def release_readers(self, *, only_writing: bool = False) -> int:
        """End readers' responses now (shutdown): each resumes from its last id elsewhere.

        With ``only_writing``, only readers stuck in a write (``writing_since`` set) are
        released; the others take what they have pending and end by themselves. Returns how
        many readers were released.
        """
        return self.readers.release(only_writing=only_writing)

    @property
    def trimmed_id(self) -> int:
        """The newest event id dropped from the buffer (0: none): older ones are in the store."""
        return self.buffer.trimmed_id
