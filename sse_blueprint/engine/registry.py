"""The streams of a worker (:class:`StreamRegistry`), and streams that live only in the store:
their replay, and the end of one whose producer is gone ("producer lost").

Imports the stream and the records; no Flask.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent

from .. import _observe
from .._event import Event
from ..storage.records import BlockStore, StoredTurn, StreamRecord
from .catchup import catch_up
from .context import Producer
from .lifecycle import ShuttingDown, StreamLimitReached, StreamState
from .ports import SharedBackend
from .stream import Stream

__all__ = ["LOST_ID_GAP", "StreamRegistry", "lost", "lost_data", "replay"]

#: A stream found "running" in the store with no live producer ends with an ``error`` event whose
#: id is this far past the last persisted id: past any event the lost producer could have sent.
LOST_ID_GAP = 1_000_000_000


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

    def __iter__(self) -> Iterator[Stream]:
        """This worker's live streams (a snapshot)."""
        return iter(list(self._streams.values()))

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
        _observe.stream_log(
            logging.WARNING, stream_id, "no producer runs it any more; ending it as lost"
        )
        self.store.save(lost(record), [])
        return self.store.load_stream(stream_id)

    def replay(self, record: StreamRecord, after: int) -> list[Event]:
        """The events a reader at ``after`` gets from a stream that lives only in the store."""
        assert self.store is not None
        events = replay(record, self.store.load_turn(record.stream_id, after), after)
        _observe.METRICS.catch_up("database")
        return events

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
                _observe.stream_log(
                    logging.WARNING,
                    stream.id,
                    "not fully persisted at shutdown (the store is unreachable)",
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
