"""The persister: writes a stream's turn to its store in the background, and retries.

One greenlet per stream, while there is something to write. Each round takes a snapshot of
what the store lacks (:meth:`Stream.unsaved`: no blocking call between the snapshot and the
write), writes it, and tells the stream what the store now covers (:meth:`Stream.stored`, which
reveals and trims). A failed write changes nothing on the stream's side (the buffer keeps every
event) and is retried with backoff, for as long as it takes.

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

__all__ = ["PERSIST_RETRY_MAX", "PERSIST_RETRY_MIN", "Persister", "Unsaved"]

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


class Persister:
    """Writes ``stream``'s changes to ``store`` whenever :meth:`request` asks for it."""

    __slots__ = ("_greenlet", "_stream", "_wanted", "failures", "store")

    def __init__(self, stream: Stream, store: BlockStore) -> None:
        self._stream = stream
        self.store = store
        self._wanted = gevent.event.Event()
        self._greenlet: Greenlet | None = None
        self.failures = 0

    def request(self) -> None:
        """Write soon (a block ended, the buffer filled up, the stream ended)."""
        self._wanted.set()
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        stream = self._stream
        _observe.current_stream.set(stream.id)
        backoff = Backoff(PERSIST_RETRY_MIN, PERSIST_RETRY_MAX)
        while True:
            self._wanted.wait()
            self._wanted.clear()
            unsaved = stream.unsaved()
            began = time.perf_counter()
            try:
                self.store.save(unsaved.record, unsaved.blocks, unsaved.events)
            except Exception as exc:
                delay = backoff.delay()
                self.failures += 1
                _observe.METRICS.persist_failed()
                log.warning(
                    "stream %s: persisting %d block(s) failed (%s); retrying in %.1fs, the "
                    "buffer keeps every event meanwhile",
                    stream.id, len(unsaved.blocks), exc, delay,
                    extra={"stream_id": stream.id},
                )  # fmt: skip
                self._wanted.set()
                gevent.sleep(delay)
                continue
            _observe.METRICS.persisted(time.perf_counter() - began)
            backoff.reset()
            if stream.stored(unsaved) and not self._wanted.is_set():
                return  # the whole finished stream is in the store
