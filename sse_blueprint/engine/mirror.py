"""A mirror: this worker's copy of a stream that another worker (or instance) produces.

A :class:`Mirror` is a :class:`~sse_blueprint.engine.Stream` without a producer and without
writes: a shared backend feeds it the owner's events (:meth:`Mirror.ingest`) and says what the
owner has persisted (:meth:`Mirror.trim_persisted`), and this worker's readers follow it like
any stream, catching up from the store for what the buffer no longer holds.

Imports the stream only; it must not import a backend, a store or the web layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from .._event import Event
from ..storage.records import BlockStore
from .stream import Stream
from .subscription import Subscription

__all__ = ["Mirror"]


def _no_producer(ctx: Any) -> None:  # pragma: no cover (a mirror never runs one)
    raise RuntimeError("a mirror has no producer")


class Mirror(Stream):
    """Another worker's stream ``stream_id``, followed here for this worker's readers."""

    def __init__(
        self,
        stream_id: str,
        *,
        store: BlockStore | None = None,
        client_queue: int = 2048,
        buffer_size: int = 1024,
    ) -> None:
        # No store for the stream itself (it writes nothing); its readers catch up from it.
        super().__init__(
            _no_producer, stream_id=stream_id, client_queue=client_queue, buffer_size=buffer_size
        )
        self.store = store
        self.writer.aggregates = False  # the owner builds and writes the turn, not a mirror
        self.retired = False  # dropped by the backend: nothing feeds it any more

    def retire(self) -> None:
        """The backend drops this mirror (it missed what Redis no longer has, or nobody read
        it): end its readers' responses, now and from now on, so that each resumes from its
        last id on the mirror that replaces it."""
        self.retired = True
        self.release_readers()

    def subscribe(
        self, last_event_id: int = 0, *, on_cut: Callable[[], None] | None = None
    ) -> Subscription:
        """As :meth:`Stream.subscribe`; on a retired mirror (a reader that found it before it
        was dropped, and subscribes after), a subscription that is already cut."""
        sub = super().subscribe(last_event_id, on_cut=on_cut)
        if self.retired:
            self.release_readers()
        return sub

    def start(self) -> NoReturn:
        raise RuntimeError("a mirror has no producer to start")

    def ingest(self, ev: Event) -> None:
        """An event the owner wrote. One already here, or one after the end, is ignored."""
        if ev.id <= self.last_event_id or self.terminal_event is not None:
            return
        if ev.id == 1:
            self.start_event = ev
        self.writer.put(ev)
        if ev.terminal:
            self.writer.ended(ev)

    def follow_from(self, first_id: int) -> None:
        """Start at ``first_id``, the oldest event the backend still holds: what came before was
        persisted and trimmed, so older readers catch up from the store."""
        self.buffer.start_at(first_id)
        if first_id > 1:
            start_data = {"stream_id": self.id, "producer": self.producer_name}
            self.start_event = Event(1, "start", start_data)
