"""The streams as the views see them (:class:`StreamService`): find one wherever it lives (run by
this worker, run by another and mirrored here, or only in the store), its status as one type,
cancel it, which are active. The views stay thin and never ask which kind they hold.

Answers with engine types and raises what the engine or the backend raises; the views make the
HTTP answers. Imports the engine and the records; not Flask, the views or a backend.
"""

from __future__ import annotations

from ..engine import Mirror, SharedBackend, Stream, StreamRegistry, StreamStatus, status_of
from ..storage.records import StreamRecord

__all__ = ["Found", "StreamService"]

#: A stream as found: live here (a :class:`Stream`, or a :class:`Mirror` of another worker's),
#: or only in the store (its record: it has ended).
Found = Stream | StreamRecord


class StreamService:
    """One app's streams on this worker, and (with a shared backend) everyone else's."""

    def __init__(self, registry: StreamRegistry, backend: SharedBackend | None) -> None:
        self.registry = registry
        self.backend = backend

    def find(self, stream_id: str) -> Found | None:
        """The stream, wherever it lives, or None (may read the store and the backend)."""
        return self.registry.find(stream_id)

    def status(self, found: Found) -> StreamStatus:
        """Its status: a mirror's from the backend (the owner's truth), with this worker's
        readers counted."""
        if isinstance(found, Mirror) and self.backend is not None:
            shared = self.backend.status(found.id)
            if shared is not None:
                return shared.with_subscribers(found.subscriber_count)
        return status_of(found)

    def cancel(self, found: Found, reason: str | None = None) -> tuple[StreamStatus, bool]:
        """Cancel a running stream: its status after, and whether this call ended it. One run
        elsewhere is ended in the backend; its owner hears of it and stops its producer."""
        if isinstance(found, Mirror) and self.backend is not None:
            data = {"stream_id": found.id, **({"reason": reason} if reason else {})}
            ended = self.backend.end(found.id, "cancelled", data) == "ok"
            return self.status(found), ended
        ended = isinstance(found, Stream) and found.cancel(reason)
        return status_of(found), ended

    def active(self, stream_ids: list[str]) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance sharing the backend."""
        if self.backend is not None:
            return self.backend.active(stream_ids)
        found = {sid: self.registry.get(sid) for sid in stream_ids}
        return {sid: s is not None and not s.finished for sid, s in found.items()}
