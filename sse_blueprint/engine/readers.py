"""A stream's readers: who follows it from where, how they are woken, cuts for lagging, and the
trim that spares what they have not taken.

:class:`Readers` holds a stream's subscriptions. When the stream reveals new events, the readers
wake on the event loop's next turn (a producer's burst becomes one write per reader). Readers
that write directly to their sockets wait *parked*: the fan-out (:class:`~.fanout.FanOut`)
writes their new events for them. A reader more than ``client_queue`` events behind is cut: its
response ends and the client resumes from its last id. Nothing is dropped for a reader that stays.

Imports the subscription, the fan-out and gevent; the stream only for typing (it reads
``stream.buffer.visible``, the one position every reader may take up to).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from .. import _observe
from .fanout import FanOut
from .subscription import Subscription

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Readers"]


class Readers:
    """The subscriptions of one stream (see the module docstring)."""

    __slots__ = (
        "_news", "_stream", "_wake_pending", "_wake_timer", "client_queue", "fan_out",
        "min_pos_hint", "subscribers",
    )  # fmt: skip

    def __init__(self, stream: Stream, client_queue: int) -> None:
        self._stream = stream
        self.client_queue = client_queue
        self.subscribers: set[Subscription] = set()
        # Lower bound of every subscriber's position, refreshed when a lag scan runs.
        self.min_pos_hint = 0
        self._news: gevent.event.Event | None = None
        self.fan_out = FanOut(stream, self)  # writes for the readers parked in poll
        self._wake_pending = False
        self._wake_timer: Any = None  # a libev timer, made on first use

    def __len__(self) -> int:
        return len(self.subscribers)

    def add(self, sub: Subscription) -> None:
        self.subscribers.add(sub)
        self.min_pos_hint = min(self.min_pos_hint, sub.pos)

    def subscribe(self, after: int, on_cut: Callable[[], None] | None) -> Subscription:
        """A reader of the events after ``after`` (see :meth:`Stream.subscribe`): no blocking
        call between its position and its registration."""
        stream = self._stream
        buffer = stream.buffer
        if after < buffer.trimmed_id:  # older than the buffer: the store first
            sub = Subscription(stream, buffer.base, after, on_cut, catch_up=True)
            _observe.METRICS.catch_up("database")
        else:
            sub = Subscription(stream, buffer.position_after(after), after, on_cut)
            _observe.METRICS.catch_up("buffer")
        if sub.from_store or not (stream.finished and sub.pos >= buffer.end):
            self.add(sub)
        return sub

    def trim(self, up_to_id: int) -> int:
        """Drop buffered events up to ``up_to_id`` that no reader still has to take (the newest
        always stays: a finished stream's terminal). Returns how many went."""
        buffer = self._stream.buffer
        count = buffer.drop(up_to_id, keep_from=self.lowest(buffer.end - 1))
        if count:
            self.min_pos_hint = max(self.min_pos_hint, buffer.base)
        return count

    def trim_persisted(self, up_to_id: int) -> None:
        """Everything up to ``up_to_id`` is in the store: drop it once no reader needs it."""
        buffer = self._stream.buffer
        buffer.trim_to = max(buffer.trim_to, up_to_id)
        self.trim(buffer.trim_to)

    def retrim(self) -> None:
        """Trim what a reader that just left may have been holding back."""
        buffer = self._stream.buffer
        if buffer.trim_to > buffer.trimmed_id:
            self.trim(buffer.trim_to)

    def discard(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def lowest(self, default: int) -> int:
        """The lowest position a reader still has to take (``default`` if lower than all)."""
        low = default
        for sub in self.subscribers:
            low = min(low, sub.pos)
        return low

    def revealed(self, visible: int) -> None:
        """Events up to ``visible`` may be taken: cut laggards, wake readers on the next turn."""
        if visible - self.min_pos_hint > self.client_queue:
            self.cut_laggards(visible)
        if (self._news is not None or self.fan_out.parked) and not self._wake_pending:
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
        self.notify()

    def notify(self) -> None:
        """Wake every waiting reader now (parked ones through the fan-out)."""
        news = self._news
        if news is not None:
            self._news = None
            news.set()
        self.fan_out.deliver()

    def wait_for_news(self, timeout: float | None) -> None:
        """Wait in :meth:`Subscription.poll` (a reader that writes for itself)."""
        news = self._news
        if news is None:
            news = self._news = gevent.event.Event()
        news.wait(timeout)

    def release(self, *, only_writing: bool = False) -> int:
        """Cut readers now (shutdown): all, or only those stuck in a write. How many."""
        subs = [s for s in self.subscribers if s.writing_since or not only_writing]
        for sub in subs:
            sub.cut = True
            self.subscribers.discard(sub)
        if subs:
            self.notify()
            self.retrim()
        return len(subs)

    def cut_laggards(self, visible: int) -> None:
        """Cut every subscriber more than ``client_queue`` events behind; refresh the hint."""
        stream_id = self._stream.id
        limit = visible - self.client_queue
        low = visible
        for sub in list(self.subscribers):
            # A reader still catching up from the store is behind by what arrived while the
            # store was read: the server's delay, not the client's. Its first poll takes all.
            if sub.pos < limit and not sub.from_store:
                sub.cut = True
                self.subscribers.discard(sub)
                _observe.METRICS.cut()
                if not sub.waiting and sub.on_cut is not None:
                    try:
                        sub.on_cut()
                    except Exception:
                        _observe.stream_log(
                            logging.ERROR, stream_id, "on_cut failed", exc_info=True
                        )
                _observe.stream_log(
                    logging.INFO,
                    stream_id,
                    "cut a subscriber %d events behind (limit %d)",
                    visible - sub.pos,
                    self.client_queue,
                )
            elif sub.pos < low:
                low = sub.pos
        self.min_pos_hint = low
        # Wake the cut subscribers (if they are waiting) so that their responses end now.
        self.notify()
