"""The one way into a stream's log (:class:`Writer`): events numbered, checked, sent through the
outbox when a backend is shared, and put in the log; and the stream's end, however it comes.

An event goes in at once without a shared backend, and once the backend acknowledged it with one
(:class:`~.outbox.Outbox`). In the log it is built into the turn (:class:`~.turn.TurnBuilder`),
handed to the persister, and shown to the readers. Every end this process writes goes through
:meth:`Writer.end`; one written elsewhere through :meth:`Writer.adopt_end`; the last resort when
none can be written through :meth:`Writer.end_locally`.

Imports the event type, the engine's outbox and gevent; the stream only for typing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gevent

from .. import _observe
from .._event import DURABLE, Event
from .lifecycle import StreamClosed, StreamState
from .outbox import Outbox
from .ports import StreamBackend

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Writer"]

log = logging.getLogger("sse_blueprint")


class Writer:
    """The write side of ``stream``. See the module docstring."""

    __slots__ = ("_on_complete", "_stream", "aggregates", "max_event_bytes", "outbox")

    def __init__(
        self,
        stream: Stream,
        backend: StreamBackend | None,
        *,
        max_event_bytes: int,
        on_complete: Callable[[Stream], None] | None,
    ) -> None:
        self._stream = stream
        self.max_event_bytes = max_event_bytes
        self._on_complete = on_complete
        self.aggregates = True  # build the turn and persist it (a mirror does neither)
        # A shared backend (Redis) sees every event first: the outbox sends them, and puts
        # each in the log once the backend acknowledged it.
        self.outbox = Outbox(stream, backend.append) if backend is not None else None

    # -- appends -------------------------------------------------------------------------------

    def append(
        self, event: str, data: Mapping[str, Any], replay: str = DURABLE, *, check: bool = False
    ) -> Event:
        """See :meth:`Stream.append`."""
        outbox = self.outbox
        if outbox is None:  # no blocking call: atomic
            ev = self._numbered(self._stream.buffer.last_id + 1, event, data, replay, check)
            self.put(ev)
            _observe.METRICS.event()
            return ev
        outbox.check_open(producer=check)
        ev = self._numbered(outbox.last_id + 1, event, data, replay, check)
        self._stream.turn.expect(ev)
        outbox.put(ev, wait=not check)  # (raises StreamClosed if it was refused)
        return ev

    def _numbered(
        self, event_id: int, event: str, data: Mapping[str, Any], replay: str, check: bool
    ) -> Event:
        stream = self._stream
        if stream.terminal_event is not None:
            raise StreamClosed(stream.id)
        ev = Event(event_id, event, data, replay)  # (refuses data that is not JSON)
        if check:
            stream.turn.check(event, data, replay)
        if len(ev.sse) > self.max_event_bytes:
            raise ValueError(
                f"event {event!r} is {len(ev.sse)} bytes, more than max_event_bytes "
                f"({self.max_event_bytes}); split it into several events"
            )
        return ev

    def took(self, events: Sequence[Event]) -> None:
        """The backend has these events (the outbox's, in order): put them in the log."""
        if self._stream.terminal_event is not None:
            return  # ended here without the backend meanwhile (:meth:`end_locally`)
        for ev in events:
            self.put(ev)
            _observe.METRICS.event()
            if ev.terminal:
                self.ended(ev)

    def dropped(self, failure: BaseException, *, waiting: Sequence[object]) -> None:
        """The backend did not take the outbox's events. Refused (:class:`StreamClosed`): they
        never happened, and the backend has adopted the end written elsewhere. Failed: they
        wait to go again, and the producer gets the failure where it blocks (unless it is one
        of the ``waiting`` greenlets, which get it anyway), as if its own send had failed."""
        if isinstance(failure, StreamClosed):
            self._stream.turn.forget_ahead()
        else:
            self._stream.producer.fail(failure, unless=waiting)

    def put(self, ev: Event) -> None:
        """Put an event (already numbered) in the live buffer, build the turn from it, have
        the blocks written when due, and wake the readers."""
        stream = self._stream
        stream.buffer.append(ev)
        persister = stream.persister
        if self.aggregates:
            ended_block = stream.turn.apply(ev)
            if persister is not None:
                persister.appended(stream.buffer.end, ended_block)
        if persister is None or not persister.durable:
            stream.reveal(stream.buffer.end)  # (durable: readers see it once it is written)

    # -- ends ----------------------------------------------------------------------------------

    def end(self, state: StreamState, data: Mapping[str, Any], *, stop_producer: bool) -> bool:
        """See :meth:`Stream.end`."""
        stream = self._stream
        if stream.terminal_event is not None:
            return False
        if self.outbox is not None and self.outbox.closing:
            # An end is on its way (a cancel while the producer returned): let it land first.
            with contextlib.suppress(Exception):
                self.outbox.join()
            return False
        try:
            ev = self.append(state.value, {"stream_id": stream.id, **data})
        except StreamClosed:
            return False  # it ended elsewhere first (the backend adopted that terminal event)
        if stream.terminal_event is not ev:  # (the outbox marks it as it puts it in the log)
            self.ended(ev)
        self.completed()
        if stop_producer:
            stream.producer.stop()
        return True

    def adopt_end(self, ev: Event) -> None:
        """See :meth:`Stream.adopt_end`."""
        stream = self._stream
        last = stream.buffer.last_id
        if stream.terminal_event is not None or ev.id <= last:
            return
        if ev.id > last + 1:
            if self.outbox is not None and self.outbox.busy:
                # Our own appends before it are still on their way back: take it after them.
                gevent.spawn_later(0.005, self.adopt_end, ev)
                return
            self._take_what_the_backend_has(ev)
        self.put(ev)
        self.ended(ev)
        self.completed()
        stream.producer.stop()

    def _take_what_the_backend_has(self, end: Event) -> None:
        """The end written elsewhere follows events this worker never took: a call that got
        no answer yet ran, then was refused when it went again. While the stream ran only
        this worker wrote to it, so the backend's events before ``end`` are those of that
        call, under the same ids: take them into the log first, as every other worker has
        them."""
        stream = self._stream
        last = stream.buffer.last_id
        unanswered = self.outbox.unanswered if self.outbox is not None else []
        held = [ev for ev in unanswered if last < ev.id < end.id]
        if [ev.id for ev in held] == list(range(last + 1, end.id)):
            self.took(held)
            return
        _observe.stream_log(
            logging.WARNING,
            stream.id,
            "its end %d follows events %d-%d that only the backend has",
            end.id,
            last + 1,
            end.id - 1,
        )

    def end_locally(self, data: Mapping[str, Any]) -> None:
        """The last resort when no end can be written (a backend that keeps failing): end the
        stream with ``error`` in this process anyway, after every id given. (With Redis, this
        worker stops renewing the lease, so the other workers end it there once it lapses.)"""
        stream = self._stream
        if stream.terminal_event is not None:
            return
        last = self.outbox.abandon() if self.outbox is not None else stream.buffer.last_id
        ev = Event(last + 1, StreamState.ERROR.value, {"stream_id": stream.id, **data})
        self.put(ev)
        self.ended(ev)
        self.completed()

    def ended(self, ev: Event) -> None:
        """Bookkeeping once the terminal event ``ev`` is in the buffer (blocks nothing)."""
        stream = self._stream
        stream.terminal_event = ev
        stream.state = StreamState(ev.event)
        stream.finished_at = time.time()
        stream.closed.set()
        stream.producer.ended()
        stream.request_flush()

    def completed(self) -> None:
        """After :meth:`ended`, on the greenlet that ended the stream: the metrics and the
        app's ``on_complete`` hook (which may block)."""
        stream = self._stream
        if stream.producer.started:
            _observe.METRICS.stream_finished(stream.producer_name, stream.state.value)
        if self._on_complete is not None:
            try:
                self._on_complete(stream)
            except Exception:
                log.exception(
                    "on_complete hook of stream %s failed",
                    stream.id,
                    extra={"stream_id": stream.id},
                )
