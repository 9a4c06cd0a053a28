"""What the engine needs from a backend shared between workers (implemented by ``RedisBackend``).

Imports only the event type (and the stream's, for typing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .._event import Event

if TYPE_CHECKING:
    from .mirror import Mirror
    from .status import StreamStatus
    from .stream import Stream

__all__ = ["Appended", "SharedBackend", "StreamBackend"]

Appended = Callable[[BaseException | None], None]
"""How a backend answers an append: None (written), :class:`StreamClosed` (refused: the stream
ended elsewhere, and the backend adopts that end) or the error that stopped the write."""


class StreamBackend(Protocol):
    """Where a stream's events go besides this worker's memory (``RedisBackend``)."""

    def claim(self, stream: Stream) -> None:
        """Become the stream's one producer (before its first event)."""

    def append(self, stream: Stream, events: Sequence[Event], done: Appended) -> None:
        """Write ``events`` (the stream's next ones, in id order) for every worker, in one
        call, without blocking; then call ``done`` once, which must not block either."""

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        """Events up to ``up_to_id`` are in the store: the shared copy may drop them."""

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        """Share the stream's metadata (or raise :class:`StreamClosed`)."""


class SharedBackend(StreamBackend, Protocol):
    """A backend shared between workers and instances (``RedisBackend``): everything the
    registry and the web layer ask of it, whichever worker runs the stream."""

    def mirror(self, stream_id: str) -> Mirror | None:
        """This worker's follower of a stream run elsewhere, or None if unknown."""

    def release_mirrors(self) -> int:
        """Shutdown: end the responses of every reader of a mirror (they resume elsewhere)."""

    def status(self, stream_id: str) -> StreamStatus | None:
        """The shared state of a stream (its subscribers: 0), or None if unknown."""

    def end(
        self, stream_id: str, state: str, data: dict[str, Any], *, if_lease_gone: bool = False
    ) -> str | None:
        """End a running stream from any worker: ``"ok"``, its state, or None if unknown."""

    def active(self, stream_ids: list[str]) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance."""

    def claim_client(self, address: str, limit: int) -> str | None:
        """Count one more open response from ``address`` everywhere: a token to release, None
        at the limit, "" when the count cannot be kept now (let through)."""

    def release_client(self, token: str) -> None:
        """The response counted with ``token`` has ended."""
