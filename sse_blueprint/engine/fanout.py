"""Fan-out (:class:`FanOut`): one greenlet writes a stream's new events to every reader parked on
it, instead of each reader's greenlet waking to write its own.

A reader that writes directly to its socket (``Subscription.direct``) waits *parked* in
:meth:`FanOut.park`, or is *held* (:meth:`FanOut.hold`) with no greenlet of its own at all. When
news comes, the fan-out takes each parked reader's pending events and writes them for it, inline
for a few (the chat shape) or from one greenlet for many, and wakes only the readers it cannot
serve (a partial or failed write, the end, a cut): it calls their ``wakeup.set()``.

Imports gevent and the log helper; the stream and its reader set only for typing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event

from .._observe import stream_log

if TYPE_CHECKING:
    from .readers import Readers
    from .stream import Stream
    from .subscription import Subscription

__all__ = ["FAN_OUT_INLINE", "FAN_OUT_SLICE", "FanOut"]

#: Seconds a fan-out runs before it lets other greenlets run.
FAN_OUT_SLICE = 0.02
#: At most this many parked readers are written to from the wake-up itself, without a
#: fan-out greenlet (a few dozen non-blocking sends take well under a millisecond).
FAN_OUT_INLINE = 16


class FanOut:
    """The parked readers of one stream, and the writes made for them."""

    __slots__ = ("_again", "_readers", "_running", "_stream", "parked")

    def __init__(self, stream: Stream, readers: Readers) -> None:
        self._stream = stream
        self._readers = readers
        self.parked: set[Subscription] = set()  # direct subscribers waiting in poll
        self._running = False  # a fan-out greenlet is scheduled or running
        self._again = False  # news came while it paused: it makes another pass

    def park(self, sub: Subscription, timeout: float | None) -> None:
        """Wait in :meth:`Subscription.poll` while the fan-out delivers ``sub``'s events."""
        wakeup = sub.wakeup
        if not isinstance(wakeup, gevent.event.Event):
            wakeup = sub.wakeup = gevent.event.Event()
        else:
            wakeup.clear()
        self.parked.add(sub)
        try:
            wakeup.wait(timeout)
        finally:
            # Before anything else runs: from here on only this greenlet writes to the client.
            self.parked.discard(sub)

    def hold(self, sub: Subscription) -> None:
        """Park ``sub`` with no greenlet waiting: its ``wakeup.set()`` brings one when needed.

        The caller has checked that nothing is pending (``sub.lag == 0``) and not blocked since.
        """
        sub.waiting = True  # a cut wakes it, as it would a parked reader, instead of shutting it
        self.parked.add(sub)

    def unpark(self, sub: Subscription) -> None:
        """Take ``sub`` off the parked set and wake it (a held reader's writes need a greenlet)."""
        self.parked.discard(sub)
        if sub.wakeup is not None:
            sub.wakeup.set()

    def deliver(self) -> None:
        """Write the new events to the parked readers (now, or from a greenlet for many)."""
        if not self.parked:
            return
        if self._running:
            self._again = True
        elif len(self.parked) <= FAN_OUT_INLINE:
            # A few readers (the chat shape): write to them right here. Their writes never
            # block, and a greenlet per wake-up would cost more than the writes.
            self._once(inline=True)
        else:
            self._running = True
            gevent.spawn_raw(self._run)

    def _run(self) -> None:
        try:
            self._again = True
            while self._again:
                self._again = False
                self._once()
        finally:
            self._running = False

    def _once(self, inline: bool = False) -> None:
        # A parked subscriber's connection belongs to this loop until the subscriber is woken
        # (and unparked) or its wait times out, which it can only do while this loop pauses:
        # hence the membership check. The pause lets the rest of the worker run when a round
        # is long (many clients, big events); ``inline`` (a few readers, maybe in the hub's own
        # callback) never pauses.
        parked = self.parked
        stream = self._stream
        clock = time.perf_counter
        began = clock()
        for i, sub in enumerate(list(parked)):
            if i & 63 == 63 and not inline and clock() - began > FAN_OUT_SLICE:
                gevent.sleep(0)
                began = clock()
            if sub not in parked:
                continue
            try:
                if not (sub.cut or sub.closed) and sub.pos < stream.buffer.visible:
                    events = sub.take()
                    if events and not sub.direct(events):  # type: ignore[misc]
                        self.unpark(sub)  # its greenlet finishes the write, or ends
                        continue
                if sub.done:
                    self.unpark(sub)
            except Exception as exc:
                # (Logged from a greenlet of its own: a log handler may block, the hub may not.)
                gevent.spawn_raw(
                    stream_log, logging.ERROR, stream.id, "direct write failed", exc_info=exc
                )
                sub.cut = True  # the client resumes from its last id
                self._readers.discard(sub)
                self.unpark(sub)
