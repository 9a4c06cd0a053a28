"""A reader's cursor into a stream's live buffer (:class:`Subscription`), and its catch-up from
the store when it resumes from further back than the buffer holds.

Imports the event type and the turn's merge; the stream only for typing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .. import _observe
from .._event import Event
from .catchup import catch_up

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Subscription", "Wakeup"]


class Wakeup(Protocol):
    """What the fan-out calls to wake a parked reader: a gevent ``Event``, or a held reader's
    own handle that spawns a greenlet for it."""

    def set(self) -> None: ...


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
        "_after", "_catchup", "_stream", "closed", "cut", "direct", "on_cut", "pos", "waiting",
        "wakeup", "writing_since",
    )  # fmt: skip

    def __init__(
        self,
        stream: Stream,
        pos: int,
        after: int,
        on_cut: Callable[[], None] | None = None,
        *,
        catch_up: bool = False,
    ) -> None:
        self._stream = stream
        # ``pos``, ``waiting``, ``wakeup`` and :meth:`take` are the handles the reader set
        # (:class:`~.readers.Readers`) and the fan-out (:class:`~.fanout.FanOut`) move, park
        # and wake the cursor by.
        self.pos = pos  # absolute index in the stream's log of the next event to deliver
        # Deliver only ids greater than this: the client's Last-Event-ID, then what its
        # catch-up covered.
        self._after = after
        self._catchup = catch_up  # the buffer no longer covers ``after``: ask the store first
        self.waiting = False
        self.cut = False
        self.closed = False
        self.on_cut = on_cut
        self.writing_since = 0.0  # when the web layer began a write still under way (0: none)
        self.direct: Callable[[list[Event]], bool] | None = None
        self.wakeup: Wakeup | None = None  # what wakes a direct subscriber (see FanOut)

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
        return self._stream.buffer.visible - self.pos

    @property
    def done(self) -> bool:
        """Nothing more will come: cut, closed, or the stream ended and all of it was taken."""
        return (
            self.cut
            or self.closed
            or (self._stream.finished and self.pos >= self._stream.buffer.end)
        )

    def poll(self, timeout: float | None) -> list[Event]:
        """Return pending events, waiting up to ``timeout`` seconds for some."""
        stream = self._stream
        if self._catchup:
            try:
                return self._catch_up()  # (not cut for lag while it reads: see Readers)
            finally:
                self._catchup = False
        if self.pos >= stream.buffer.visible and not self.done:
            self.waiting = True
            try:
                if self.direct is None:
                    stream.readers.wait_for_news(timeout)
                else:
                    stream.readers.fan_out.park(self, timeout)
            finally:
                self.waiting = False
        if self.cut or self.closed:
            return []
        return self.take()

    def take(self) -> list[Event]:
        """The pending events, marked as delivered."""
        events = self._stream.buffer.visible_from(self.pos)
        self.pos += len(events)
        if events and events[0].id <= self._after:
            # A Last-Event-ID, or a catch-up, ahead of the buffer: skip what the client has.
            events = [e for e in events if e.id > self._after]
        return events

    def _catch_up(self) -> list[Event]:
        """The turn from the store merged with the buffer: an exact snapshot, then live events.

        This reader was registered at the start of the buffer, which pins it (nothing after
        that is trimmed) while the store is read. Every event the store does not cover is newer
        than what was trimmed, so it is in the pinned buffer. The merge below does not block, so
        the snapshot and the switch to live events are one step.
        """
        stream, after = self._stream, self._after
        store = stream.store
        assert store is not None
        try:
            stored = store.load_turn(stream.id, after)
        except Exception as exc:
            _observe.stream_log(
                logging.WARNING,
                stream.id,
                "catch-up from the store failed (%s); cutting reader",
                exc,
            )
            self.cut = True
            stream.readers.discard(self)
            return []
        if self.done:
            return []
        buffer = stream.buffer
        out = catch_up(stored, buffer.visible_from(self.pos), after)
        start = stream.start_event
        if start is not None and after < start.id <= buffer.trimmed_id:
            out.insert(0, start)
        # The store may hold more than the buffer shows: a write committed whose writer has not
        # resumed (durable delivery), or, on a mirror, events the owner persisted that this
        # worker has not been sent yet. This reader goes on after what the snapshot covers,
        # whenever those events reach the buffer.
        covered = max((e.id for e in out), default=0)
        self.pos = max(buffer.visible, buffer.position_after(covered))
        self._after = max(after, covered)
        return out

    def hold(self) -> None:
        """Park with no greenlet waiting (a held reader; see :meth:`.FanOut.hold`)."""
        self._stream.readers.fan_out.hold(self)

    def wake(self) -> None:
        """Unpark and wake (through ``wakeup``) a parked or held reader."""
        self._stream.readers.fan_out.unpark(self)

    def close(self) -> None:
        """Stop following the stream. Idempotent."""
        if not self.closed:
            self.closed = True
            stream = self._stream
            stream.readers.discard(self)
            stream.readers.retrim()  # this reader may have been holding it back
