"""What the engine needs from a backend shared between workers (implemented by ``RedisBackend``).

Imports only the event type (and the stream's, for typing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .._event import Event

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["SharedBackend", "StreamBackend"]


class StreamBackend(Protocol):
    """Where a stream's events go besides this worker's memory (``RedisBackend``)."""

    def claim(self, stream: Stream) -> None:
        """Become the stream's one producer (before its first event)."""

    def append(self, stream: Stream, event: Event) -> None:
        """Write ``event`` for every worker, or raise :class:`StreamClosed` (ended elsewhere)."""

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        """Events up to ``up_to_id`` are in the store: the shared copy may drop them."""

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        """Share the stream's metadata (or raise :class:`StreamClosed`)."""


class SharedBackend(StreamBackend, Protocol):
    """What the registry needs of a backend shared between workers (``RedisBackend``)."""

    def mirror(self, stream_id: str) -> Stream | None:
        """This worker's follower of a stream run elsewhere, or None if unknown."""
