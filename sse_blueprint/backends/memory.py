"""An in-memory shared backend: several "workers" in one process, joined as Redis joins them.

A :class:`MemoryHub` plays Redis: each stream's events (trimmed once persisted), its state, its
owner, and the open responses per client address. Each worker (each app) gets its own
:class:`MemoryBackend` on the hub, through ``sse.init_app(app, backend=MemoryBackend(hub))``. A
stream started on one worker is followed on the others by a :class:`~sse_blueprint.engine.Mirror`
fed with the owner's events as they are appended; a cancel on any worker ends it for its owner;
the client limit per address holds across the workers.

It implements the whole :class:`~sse_blueprint.engine.SharedBackend` port, so the engine and the
views are tested across workers without Redis, and it is the port's reference. It shares nothing
between processes: not for production (use ``SSE_REDIS_URL``). Everything here runs without a
blocking call, so each method is atomic under gevent.

Imports the engine only.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from ..engine import Appended, Event, Mirror, Stream, StreamClosed, StreamStatus

__all__ = ["MemoryBackend", "MemoryHub"]


@dataclasses.dataclass
class _Shared:
    """One stream as every worker sees it (Redis's ``meta`` hash and events)."""

    owner: Stream
    producer: str
    created_at: float
    metadata: Mapping[str, Any]
    state: str = "running"
    last_id: int = 0
    finished_at: float | None = None
    events: list[Event] = dataclasses.field(default_factory=list)  # from the oldest unpersisted


class MemoryHub:
    """What every worker's :class:`MemoryBackend` shares (Redis's part). It forgets no stream
    (Redis lets them expire after ``SSE_RETENTION``): a hub lives as long as a test."""

    def __init__(self) -> None:
        self.streams: dict[str, _Shared] = {}
        self.workers: list[MemoryBackend] = []
        self.clients: dict[str, str] = {}  # open response's token -> its client's address

    def publish(self, stream_id: str, deliver: Callable[[Mirror], None]) -> None:
        """Deliver to every worker's mirror of the stream (Pub/Sub)."""
        for worker in self.workers:
            mirror = worker.mirrors.get(stream_id)
            if mirror is not None:
                deliver(mirror)


class MemoryBackend:
    """One worker's side of a :class:`MemoryHub`. See the module docstring.

    ``make_mirror`` makes this worker's follower of another worker's stream; by default one with
    the owner's store, ``client_queue`` and ``buffer_size`` (one process: the same database).
    """

    def __init__(self, hub: MemoryHub, *, make_mirror: Callable[[str], Mirror] | None = None):
        self.hub = hub
        self.make_mirror = make_mirror
        self.mirrors: dict[str, Mirror] = {}
        hub.workers.append(self)

    # -- the owner's side (StreamBackend) -------------------------------------------------------

    def claim(self, stream: Stream) -> None:
        self.hub.streams[stream.id] = _Shared(
            stream, stream.producer_name, stream.created_at, dict(stream.metadata)
        )

    def append(self, stream: Stream, events: Sequence[Event], done: Appended) -> None:
        shared = self.hub.streams[stream.id]
        if shared.state != "running" or shared.owner is not stream:
            done(StreamClosed(stream.id))  # ended elsewhere: the owner adopted that end
            return
        for event in events:
            shared.events.append(event)
            shared.last_id = event.id
            if event.terminal:
                shared.state, shared.finished_at = event.event, time.time()
            self.hub.publish(stream.id, partial(_ingest, event))
        done(None)

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        shared = self.hub.streams[stream.id]
        shared.events = [e for e in shared.events if e.id >= up_to_id]  # (XTRIM MINID)
        self.hub.publish(stream.id, lambda mirror: mirror.trim_persisted(up_to_id))

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        shared = self.hub.streams[stream.id]
        if shared.state != "running":
            raise StreamClosed(stream.id)
        shared.metadata = dict(metadata)

    # -- from any worker (SharedBackend) --------------------------------------------------------

    def mirror(self, stream_id: str) -> Mirror | None:
        shared = self.hub.streams.get(stream_id)
        if shared is None:
            return None
        mirror = self.mirrors.get(stream_id)
        if mirror is not None:
            return mirror  # (once ended, its readers catch up from the store, as anywhere)
        owner = shared.owner
        if self.make_mirror is not None:
            mirror = self.make_mirror(stream_id)
        else:
            mirror = Mirror(
                stream_id,
                store=owner.store,
                client_queue=owner.client_queue,
                buffer_size=owner.buffer_size,
            )
        mirror.producer_name = shared.producer
        mirror.metadata = dict(shared.metadata)
        mirror.follow_from(shared.events[0].id if shared.events else shared.last_id + 1)
        for event in shared.events:
            mirror.ingest(event)
        self.mirrors[stream_id] = mirror
        return mirror

    def release_mirrors(self) -> int:
        return sum(mirror.release_readers() for mirror in self.mirrors.values())

    def status(self, stream_id: str) -> StreamStatus | None:
        shared = self.hub.streams.get(stream_id)
        if shared is None:
            return None
        return StreamStatus(
            stream_id,
            shared.state,
            shared.last_id,
            shared.producer,
            shared.created_at,
            shared.finished_at,
            dict(shared.metadata),
        )

    def end(
        self, stream_id: str, state: str, data: dict[str, Any], *, if_lease_gone: bool = False
    ) -> str | None:
        shared = self.hub.streams.get(stream_id)
        if shared is None:
            return None
        if shared.state != "running" or if_lease_gone:
            return shared.state  # (an owner in one process never loses its lease)
        event = Event(shared.last_id + 1, state, data)
        shared.events.append(event)
        shared.state, shared.last_id, shared.finished_at = state, event.id, time.time()
        shared.owner.adopt_end(event)  # (Redis: the owner hears of it on its ends channel)
        self.hub.publish(stream_id, lambda mirror: mirror.ingest(event))
        return "ok"

    def active(self, stream_ids: list[str]) -> dict[str, bool]:
        streams = self.hub.streams
        return {sid: sid in streams and streams[sid].state == "running" for sid in stream_ids}

    def claim_client(self, address: str, limit: int) -> str | None:
        if sum(1 for a in self.hub.clients.values() if a == address) >= limit:
            return None
        token = secrets.token_hex(8)
        self.hub.clients[token] = address
        return token

    def release_client(self, token: str) -> None:
        self.hub.clients.pop(token, None)


def _ingest(event: Event, mirror: Mirror) -> None:
    mirror.ingest(event)
