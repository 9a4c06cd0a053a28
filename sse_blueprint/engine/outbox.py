"""The way out to a shared backend (:class:`Outbox`): a stream's numbered events, sent in one
call per pause of the producer, and put in the stream's log only once acknowledged.

A producer's event is not waited for. It is queued, and at the end of the loop turn in which the
producer pauses (any blocking call: ``ctx.sleep``, a read from the model), everything it queued
goes to the backend as one call: with Redis, one script call, in a round trip shared with every
other stream's. While a call is out, the next events gather for the next one.

Once the backend acknowledges a call, its events go into the live buffer in order (readers see
them, the turn builds them, the persister writes them). If it refuses them (the stream ended
elsewhere, another producer took it over), they never happened: none is in the buffer, the turn
or the store, and neither is anything queued after them. A call that gets no answer (the
backend unreachable for longer than its patience) may or may not have been written: its events
stay first in the queue and go again with the next call, which writes what the backend lacks
of them, and the failure is raised in the producer (where it blocks, and at its next send), so
the stream ends with an error once its end can be written, with every event it had sent. If
such a call did run and the stream is ended elsewhere before its events go again, they are
refused, yet the backend holds them: the end adopted then takes them first (from
:attr:`Outbox.unanswered`), so that this worker has what every other has.

An engine append (the start, the end) waits for its call's outcome, and so does a producer that
has queued ``max_events`` events or ``max_bytes`` bytes without pausing (backpressure while the
backend is slow).

Imports the event type and gevent; the stream only for typing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from .._event import Event
from .lifecycle import StreamClosed
from .ports import Appended

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Outbox", "Send"]

Send = Callable[["Stream", Sequence[Event], Appended], None]
"""A backend's append (:meth:`StreamBackend.append`): sends without blocking, calls back once."""

_Waiter = tuple["AsyncResult[None]", object]  # an outcome to set, and the greenlet waiting on it


class Outbox:
    """The events of ``stream`` on their way through ``send``. See the module docstring."""

    __slots__ = (
        "_in_flight", "_in_flight_waiters", "_numbered", "_queued", "_queued_bytes", "_scheduled",
        "_send", "_stream", "_waiters", "closing", "failure", "max_bytes", "max_events",
        "unanswered",
    )  # fmt: skip

    def __init__(
        self, stream: Stream, send: Send, *, max_events: int = 256, max_bytes: int = 1 << 20
    ) -> None:
        self._stream = stream
        self._send = send
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._queued: list[Event] = []  # for the next call, in id order
        self._queued_bytes = 0
        self._waiters: list[_Waiter] = []  # who waits for the next call's outcome
        self._in_flight: Sequence[Event] = ()  # the call out now (empty: none)
        self._in_flight_waiters: list[_Waiter] = []
        self._scheduled = False  # the next call goes out on the loop's next turn
        self.closing = False  # a terminal event is queued or out: nothing may follow it
        self._numbered = 0  # the newest id queued so far (0 after a refusal)
        self.failure: BaseException | None = None  # a call got no answer: the producer's sends fail
        # The events of the last call that got no answer, in id order: the backend may hold
        # them (it ran the call; the answer was lost), even if it refuses them when they go
        # again (the stream was ended elsewhere meanwhile).
        self.unanswered: list[Event] = []

    @property
    def last_id(self) -> int:
        """The newest id given: in the log, queued or out."""
        return max(self._numbered, self._stream.buffer.last_id)

    def check_open(self, *, producer: bool) -> None:
        """Raise if nothing more may be queued: :class:`StreamClosed` once an end is on its
        way; for the producer, the failure of a call that got no answer (its events wait to go
        again with the stream's end)."""
        if self.closing:
            raise StreamClosed(self._stream.id)
        if producer and self.failure is not None:
            raise self.failure

    @property
    def busy(self) -> bool:
        """Events are queued or out (not in the log yet)."""
        return bool(self._queued or self._in_flight)

    def put(self, ev: Event, *, wait: bool) -> None:
        """Queue ``ev`` (numbered ``last_id + 1``, checked). With ``wait``, or when the queue is
        full, block until its call's outcome: raise :class:`StreamClosed` if it was refused, or
        the failure of a call that got no answer."""
        self._queued.append(ev)
        self._queued_bytes += len(ev.sse)
        self._numbered = ev.id
        if ev.terminal:
            self.closing = True
        if not self._scheduled and not self._in_flight:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._send_queued)
        if wait or len(self._queued) >= self.max_events or self._queued_bytes >= self.max_bytes:
            self._wait(self._waiters)

    def join(self) -> None:
        """Send what is queued (unless a call is out) and wait until it has its outcome; raise
        it if it failed."""
        if self._queued:
            if not self._scheduled and not self._in_flight:
                self._scheduled = True
                gevent.get_hub().loop.run_callback(self._send_queued)
            self._wait(self._waiters)
        elif self._in_flight:
            self._wait(self._in_flight_waiters)

    @staticmethod
    def _wait(waiters: list[_Waiter]) -> None:
        outcome: AsyncResult[None] = AsyncResult()
        waiters.append((outcome, gevent.getcurrent()))
        outcome.get()

    def _send_queued(self) -> None:
        """Send what is queued as one call. (In the hub, or on the backend's writer when a call
        was answered: nothing here may block.)"""
        self._scheduled = False
        if self._in_flight or not self._queued:
            return
        batch = self._queued
        self._in_flight, self._in_flight_waiters = batch, self._waiters
        self._queued, self._queued_bytes, self._waiters = [], 0, []
        try:
            self._send(self._stream, batch, partial(self._sent, batch))
        except Exception as exc:  # (a backend that raises instead of calling back)
            self._sent(batch, exc)

    def _sent(self, batch: Sequence[Event], failure: BaseException | None) -> None:
        """The backend's answer to one call. (Must not block: see :meth:`_send_queued`.)"""
        waiters = self._in_flight_waiters + (self._waiters if failure is not None else [])
        self._in_flight, self._in_flight_waiters = (), []
        stream = self._stream
        if failure is None:
            self.unanswered = []
            stream.writer.took(batch)
        elif isinstance(failure, StreamClosed):
            # Refused: these never happened, nor what was queued after them.
            self._queued, self._queued_bytes, self._waiters = [], 0, []
            self.closing = False
            self._numbered = 0  # (the end adopted takes the next id)
            stream.writer.dropped(failure, waiting=[greenlet for _, greenlet in waiters])
        else:
            # No answer: the backend may have written them or not. They stay first in the
            # queue, to go again with the next call (the end, at the latest), which writes
            # what it lacks of them; until then the producer's sends fail.
            self._queued[:0] = batch
            self.unanswered = list(batch)  # (those of an earlier one come first in it)
            self._queued_bytes += sum(len(ev.sse) for ev in batch)
            self._waiters = []
            self.failure = failure
            stream.writer.dropped(failure, waiting=[greenlet for _, greenlet in waiters])
        for outcome, _ in waiters:
            if failure is None:
                outcome.set(None)
            else:
                outcome.set_exception(failure)
        if self._queued and failure is None:  # what was written while the call was out
            self._send_queued()

    def abandon(self) -> int:
        """The stream ends here without its backend (the last resort): drop what is queued
        (an answer to the call out is ignored) and return the newest id given."""
        waiters, self._waiters = self._waiters, []
        last = self.last_id
        self._queued, self._queued_bytes = [], 0
        self.closing = True
        for outcome, _ in waiters:
            outcome.set_exception(StreamClosed(self._stream.id))
        return last
