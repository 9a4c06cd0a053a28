"""The persister: writes a stream's turn to its store in the background, and retries.

One greenlet per stream, while there is something to write. Each round takes a snapshot of
what the store lacks (:func:`unsaved`: no blocking call between the snapshot and the write),
writes it, and tells the stream what the store now covers (:meth:`Stream.covered`: it trims;
a durable stream's readers then see what was written). A failed write changes nothing on the
stream's side (the buffer keeps every event) and is retried with backoff, as long as it takes.

Imports the store's port, the records and gevent; the stream only for typing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import gevent
import gevent.event
from gevent import Greenlet

from .. import _observe
from .._backoff import Backoff
from ..storage.records import BlockStore, StreamRecord, TurnBlock, TurnEvent

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["PERSIST_RETRY_MAX", "PERSIST_RETRY_MIN", "Persister", "Unsaved", "record", "unsaved"]

log = logging.getLogger("sse_blueprint")

PERSIST_RETRY_MIN = 0.1
PERSIST_RETRY_MAX = 5.0


class Unsaved(NamedTuple):
    """What one write holds: everything up to ``last_id`` (log position ``end_pos``)."""

    end_pos: int
    last_id: int
    record: StreamRecord
    blocks: Sequence[TurnBlock]
    events: Sequence[TurnEvent]


def record(stream: Stream) -> StreamRecord:
    """The stream's durable state now."""
    terminal = stream.terminal_event
    return StreamRecord(
        stream_id=stream.id,
        producer=stream.producer_name,
        state=stream.state.value,
        last_event_id=stream.last_event_id,
        created_at=stream.created_at,
        metadata=stream.metadata,
        finished_at=stream.finished_at,
        terminal=terminal.event if terminal else None,
        terminal_id=terminal.id if terminal else None,
        terminal_data=terminal.data if terminal else None,
    )


def unsaved(stream: Stream) -> Unsaved:
    """What the store lacks now (blocks nothing)."""
    blocks, events = stream.turn.unsaved(stream.id)
    buffer = stream.buffer
    return Unsaved(buffer.end, buffer.last_id, record(stream), blocks, events)


class Persister:
    """Writes ``stream``'s changes to ``store`` whenever :meth:`request` asks for it."""

    __slots__ = (
        "_greenlet", "_stream", "_wanted", "durable", "failures", "persisted_id",
        "persisted_pos", "store",
    )  # fmt: skip

    def __init__(self, stream: Stream, store: BlockStore, *, durable: bool = False) -> None:
        self._stream = stream
        self.store = store
        self.durable = durable  # readers see an event only once it is written
        self._wanted = gevent.event.Event()
        self._greenlet: Greenlet | None = None
        self.failures = 0
        self.persisted_id = 0  # every event up to this id is in the store
        self.persisted_pos = 0  # the log position just past persisted_id

    def request(self) -> None:
        """Write soon (a block ended, the buffer filled up, the stream ended)."""
        self._wanted.set()
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def appended(self, end_pos: int, ended_block: bool) -> None:
        """An event went into the log (now ``end_pos`` long): write if a block ended, if more
        than ``buffer_size`` events are unsaved, or at once (durable)."""
        if ended_block or self.durable or end_pos - self.persisted_pos > self._stream.buffer_size:
            self.request()

    def _run(self) -> None:
        stream = self._stream
        _observe.current_stream.set(stream.id)
        backoff = Backoff(PERSIST_RETRY_MIN, PERSIST_RETRY_MAX)
        while True:
            self._wanted.wait()
            self._wanted.clear()
            todo = unsaved(stream)
            began = time.perf_counter()
            try:
                self.store.save(todo.record, todo.blocks, todo.events)
            except Exception as exc:
                delay = backoff.delay()
                self.failures += 1
                _observe.METRICS.persist_failed()
                _observe.stream_log(
                    logging.WARNING,
                    stream.id,
                    "persisting %d block(s) failed (%s); retrying in %.1fs, the buffer keeps "
                    "every event meanwhile",
                    len(todo.blocks),
                    exc,
                    delay,
                )
                self._wanted.set()
                gevent.sleep(delay)
                continue
            _observe.METRICS.persisted(time.perf_counter() - began)
            backoff.reset()
            if self._stored(todo) and not self._wanted.is_set():
                return  # the whole finished stream is in the store

    def _stored(self, done: Unsaved) -> bool:
        """The store now holds ``done``: tell the stream. True once it holds the whole finished
        stream."""
        stream = self._stream
        stream.turn.saved(done.blocks, done.events)
        if done.last_id > self.persisted_id:
            self.persisted_id, self.persisted_pos = done.last_id, done.end_pos
            if self.durable:
                stream.reveal(done.end_pos)
        if done.blocks or done.events or len(stream.buffer) > stream.buffer_size:
            # (A write of the record alone trims nothing: that would only send new readers to
            # the store for the ``start`` event.)
            stream.covered(self.persisted_id)
        if stream.finished and self.persisted_id >= stream.last_event_id:
            if not stream.saved.is_set():
                _observe.stream_log(logging.DEBUG, stream.id, "saved")
            stream.saved.set()
            return True
        return False
