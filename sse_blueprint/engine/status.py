"""A stream's status as one type (:class:`StreamStatus`), whichever way it was found: run here,
followed from another worker (the shared backend's copy), or only in the store.

Imports the stream's and the records' types only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..storage.records import StreamRecord

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["StreamStatus", "status_of"]


@dataclasses.dataclass(frozen=True)
class StreamStatus:
    """What ``GET /streams/<id>/status`` answers (:meth:`to_json`)."""

    stream_id: str
    state: str
    last_event_id: int
    producer: str
    created_at: float
    finished_at: float | None
    metadata: Mapping[str, Any]
    subscribers: int = 0  # this worker's readers

    def with_subscribers(self, subscribers: int) -> StreamStatus:
        return dataclasses.replace(self, subscribers=subscribers)

    def to_json(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "state": self.state,
            "last_event_id": self.last_event_id,
            "producer": self.producer,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "subscribers": self.subscribers,
            "metadata": dict(self.metadata),
        }


def status_of(found: Stream | StreamRecord) -> StreamStatus:
    """The status of a stream of this worker (or a mirror's local view), or of a record."""
    if isinstance(found, StreamRecord):
        return StreamStatus(
            found.stream_id,
            found.state,
            found.terminal_id or found.last_event_id,
            found.producer,
            found.created_at,
            found.finished_at,
            found.metadata,
        )
    return StreamStatus(
        found.id,
        found.state.value,
        found.last_event_id,
        found.producer_name,
        found.created_at,
        found.finished_at,
        found.metadata,
        found.subscriber_count,
    )
