"""Redis backend: one stream, many workers and instances (``SSE_REDIS_URL``).

The backend (:class:`RedisBackend`) is the calls any worker makes (end, status, active); it
composes this package's parts: ``scripts`` (keys and Lua), ``connection`` (the pool and the retry
rule), ``owners`` (the owner's writes, fencing and lease), ``pubsub`` (the worker's Pub/Sub
reader), ``mirrors`` (followers of others' streams) and ``clients`` (open responses per
address).

Redis is the distributed engine; there is no broker of our own. Per stream (keys hash-tagged
``{id}`` so that one stream's keys share a Redis Cluster slot):

* ``sse:{id}:events``: a Redis Stream of the events, entry id ``<event id>-0``;
* ``sse:{id}:meta``: a hash: producer, state, generation, last id, times;
* ``sse:{id}:lease``: the owner's lease (its generation, with a TTL);
* channel ``sse:{id}``: every event, published in the same Lua call that appends it (``"o": 1``
  marks the owner's own appends), for the other workers' mirrors;
* channel ``sse:{id}:ends``: an end written by another worker (a cancel, a lost lease), for the
  owner, which does not follow the stream's own channel.

**One producer per stream.** The worker that starts a stream writes a random generation into
``meta``; every append is a Lua script that checks the generation and that the stream is still
running, then ``XADD``\\ s and ``PUBLISH``\\ es atomically. A stale or fenced-out writer is refused.
The owner renews its lease; if the owner dies, the lease expires and any worker that follows the
stream appends ``error: producer lost`` (atomically, once) so readers everywhere end.

**One reader per stream per worker.** A worker has one Pub/Sub connection. A stream with
readers on a worker other than its owner gets one *mirror* there: a :class:`Stream` without a
producer, filled from ``XRANGE`` once its channel subscription is confirmed, then fed by the
published events (a gap in ids is filled with ``XRANGE``). All of that worker's readers follow the
mirror with the engine's usual cursors: the commands per event do not grow with the clients.

**Clients per address, everywhere.** ``sse:clients:{<address>}`` is a sorted set of the open
responses of one client address on every worker and instance (member: a response's token,
score: when it expires, by Redis's clock). A Lua script drops the expired members, counts and
adds in one step, so ``SSE_MAX_CLIENTS_PER_ADDRESS`` holds across the deployment. Each worker
renews its members every ``lease`` seconds and removes them when the responses end; a worker that
dies without doing so frees its places within three leases. One greenlet per worker sends all of
that, batched in pipelines on one connection: however many clients connect at once, counting
them takes one connection per worker.

**Cancel from anywhere.** A Lua script appends ``cancelled`` itself (if the stream still runs)
and publishes it; the owner adopts that terminal event and stops its producer. The state in
``meta`` is the durable flag, re-read when the owner renews its lease, so a lost message only
delays the stop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.client import Pipeline

from ... import _wire
from ...engine import Appended, Event, Mirror, Stream, StreamStatus, lost_data
from ...storage.records import BlockStore
from .clients import ClientCounter
from .connection import RedisConnection, is_transient
from .mirrors import Mirrors
from .owners import Owners
from .pubsub import PubSub
from .scripts import (
    END,
    LOST_IN_REDIS,
    ends_channel,
    stream_keys,
)

__all__ = ["LOST_IN_REDIS", "RedisBackend", "is_transient"]

log = logging.getLogger("sse_blueprint")


class RedisBackend:
    """Streams shared through Redis. One per app per worker; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        lease: float = 10.0,
        retention: float = 300.0,
        make_mirror: Callable[[str], Mirror] | None = None,
        store: BlockStore | None = None,
    ) -> None:
        self.conn = RedisConnection(url, patience=max(lease, 5.0))
        self.redis = self.conn.redis
        self.url = url
        self.lease = lease
        self.retention = retention
        self.store = store
        self._end = self.conn.script(END)
        self.pubsub = PubSub(self.conn)
        self.owners = Owners(self.conn, self.pubsub, lease=lease, retention=retention)
        self._mirrors = Mirrors(
            self.conn, self.pubsub, lease=lease, make_mirror=make_mirror, store=store,
            end=self.end,
        )  # fmt: skip
        self.clients = ClientCounter(self.conn, lease)

    # -- the owner's side (see Owners) --------------------------------------------------------

    def claim(self, stream: Stream) -> None:
        self.owners.claim(stream)

    def append(self, stream: Stream, events: Sequence[Event], done: Appended) -> None:
        self.owners.append(stream, events, done)

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        self.owners.set_metadata(stream, metadata)

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        self.owners.persisted(stream, up_to_id)

    # -- from any worker ----------------------------------------------------------------------

    def end(
        self, stream_id: str, state: str, data: dict[str, Any], *, if_lease_gone: bool = False
    ) -> str | None:
        """End a running stream (``cancelled``, or ``error`` when its owner is gone).

        Returns ``"ok"`` if this call ended it, else its state (``running`` if its lease is still
        held and ``if_lease_gone``), or None if Redis does not know the stream.
        """
        meta, events, lease, channel = stream_keys(stream_id)
        data_json = _wire.dumps(data)
        result = self.conn.retrying(
            self._end,
            [meta, events, lease],
            [
                state,
                data_json,
                int(self.retention),
                time.time(),
                channel,
                "1" if if_lease_gone else "0",
                _wire.relay_message_head(state, data_json),
                ends_channel(stream_id),
                self.conn.publish,
            ],
        )
        return result.decode() if isinstance(result, bytes) else result

    def status(self, stream_id: str) -> StreamStatus | None:
        meta = stream_keys(stream_id)[0]
        raw = self.conn.retrying(self.conn.redis.hgetall, meta)
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("state") == "running" and not self.conn.retrying(
            self.conn.redis.exists, stream_keys(stream_id)[2]
        ):
            gone = lost_data(stream_id)
            if self.end(stream_id, "error", gone, if_lease_gone=True) == "ok":
                return self.status(stream_id)
        finished = fields.get("finished_at")
        return StreamStatus(
            stream_id,
            fields.get("state", "running"),
            int(fields.get("last_id", 0)),
            fields.get("producer", ""),
            float(fields.get("created_at", 0)),
            float(finished) if finished else None,
            json.loads(fields.get("metadata", "{}")),
        )

    def active(self, stream_ids: list[str]) -> dict[str, bool]:
        """Which of these streams are running, on any worker or instance."""

        def states_of(pipe: Pipeline) -> None:
            for stream_id in stream_ids:
                pipe.hget(stream_keys(stream_id)[0], "state")

        states = self.conn.pipelined(states_of)
        return {sid: st == b"running" for sid, st in zip(stream_ids, states, strict=True)}

    def mirror(self, stream_id: str) -> Mirror | None:
        """This worker's mirror of a stream that another worker runs, or None if unknown."""
        return self._mirrors.get(stream_id)

    @property
    def mirrors(self) -> dict[str, Mirror]:
        return self._mirrors.streams

    def release_mirrors(self) -> int:
        """Shutdown: end the responses of every reader of a mirror (they resume elsewhere)."""
        return self._mirrors.release()

    def claim_client(self, address: str, limit: int) -> str | None:
        """See :meth:`ClientCounter.claim`."""
        return self.clients.claim(address, limit)

    def release_client(self, token: str) -> None:
        self.clients.release(token)
