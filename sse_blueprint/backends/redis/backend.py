"""Redis backend: one stream, many workers and instances (``SSE_REDIS_URL``).

The backend (:class:`RedisBackend`) is the owner's side and the calls any worker makes; it
composes this package's parts: ``scripts`` (keys and Lua), ``connection`` (the pool and the retry
rule), ``pubsub`` (the worker's Pub/Sub reader), ``mirrors`` (followers of others' streams) and
``clients`` (open responses per address).

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
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import gevent
import redis
from redis.client import Pipeline

from ... import _wire
from ..._batch import Batcher
from ..._event import DURABLE
from ...engine import Event, Mirror, Stream, StreamClosed, StreamState, lost_data
from ...storage.records import BlockStore
from .clients import ClientCounter
from .connection import REDIS_ERRORS, LuaScript, RedisConnection, is_transient
from .mirrors import Mirrors
from .pubsub import PubSub
from .scripts import (
    APPEND,
    END,
    LOST_IN_REDIS,
    RENEW,
    SET_METADATA,
    ends_channel,
    event_from_entry,
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
        self._lease_ms = int(lease * 1000)
        self.retention = retention
        self.store = store
        self._append = self.conn.script(APPEND)
        # Owners' appends, and apart from them their lease renewals, batched across streams:
        # each caller waits for its own outcome. (Apart: a renewal must not wait behind appends
        # that are retrying while Redis is away, or the lease lapses just as Redis is back.)
        self._calls: Batcher[tuple[LuaScript, list[str], list[Any]], Any] = Batcher(
            self._run_scripts
        )
        # (Retried for a third of a lease at most: the next round comes soon anyway.)
        self._renewals: Batcher[tuple[LuaScript, list[str], list[Any]], Any] = Batcher(
            partial(self._run_scripts, patience=lease / 3)
        )
        self._end = self.conn.script(END)
        self._renew = self.conn.script(RENEW)
        self._set_metadata = self.conn.script(SET_METADATA)
        self.owned: dict[str, tuple[Stream, str]] = {}  # stream id -> (stream, generation)
        self.pubsub = PubSub(self.conn)
        self._mirrors = Mirrors(
            self.conn, self.pubsub, lease=lease, make_mirror=make_mirror, store=store,
            end=self.end,
        )  # fmt: skip
        self.clients = ClientCounter(self.conn, lease)

    # -- owner side --------------------------------------------------------------------------

    def claim(self, stream: Stream) -> None:
        meta, _, lease, _ = stream_keys(stream.id)
        gen = secrets.token_hex(8)

        def start(pipe: Pipeline) -> None:
            pipe.hset(
                meta,
                mapping={
                    "gen": gen,
                    "state": "running",
                    "producer": stream.producer_name,
                    "created_at": repr(stream.created_at),
                    "last_id": 0,
                    "metadata": json.dumps(stream.metadata),
                },
            )
            pipe.set(lease, gen, px=int(self.lease * 1000))

        self.conn.pipelined(start, transaction=True)
        self.owned[stream.id] = (stream, gen)
        # To hear of a cancel made elsewhere; not the stream's own channel, which would bring it
        # every event it appends (the Pub/Sub reader parsing them took a quarter of its time).
        self.pubsub.follow(
            ends_channel(stream.id), lambda payload: self._ended_elsewhere(stream, payload)
        )
        gevent.spawn(self._renew_loop, stream, gen)

    def _ended_elsewhere(self, stream: Stream, payload: dict[str, Any]) -> None:
        event = Event(payload["id"], payload["e"], payload["d"])
        if event.terminal:
            stream.adopt_end(event)

    def append(self, stream: Stream, event: Event) -> None:
        try:
            try:
                self._calls.submit((self._append, *self._append_call(stream, event)))
            except redis.ResponseError as exc:
                if not str(exc).startswith("GAP "):
                    raise
                self._fill_gap(stream, int(str(exc).split()[1]), event)
        except redis.ResponseError as exc:
            self._refused(stream, exc)
            raise StreamClosed(stream.id) from exc

    def _append_call(
        self, stream: Stream, event: Event, *, gap: bool = False
    ) -> tuple[list[str], list[Any]]:
        meta, events, lease, channel = stream_keys(stream.id)
        gen = self.owned[stream.id][1]
        terminal = event.event if event.terminal else ""
        args = [
            gen,
            event.id,
            event.event,
            event.json,
            terminal,
            int(self.retention),
            time.time(),
            channel,
            _wire.relay_message(event.id, event.event, event.json, own=True, replay=event.replay),
            "" if event.replay == DURABLE else event.replay,
            self.conn.publish,
            "1" if gap else "",
        ]
        return [meta, events, lease], args

    def _fill_gap(self, stream: Stream, redis_last: int, event: Event) -> None:
        """Redis has lost events it acknowledged (a failover promoted a replica that had not
        got them yet): write them again from this owner's buffer, then ``event``. What the
        buffer no longer holds was persisted first: readers get it from the store."""
        missing = [ev for ev in stream.buffered_after(redis_last) if ev.id < event.id]
        log.warning(
            "stream %s: Redis lost events %d-%d it had acknowledged (a failover?); writing "
            "them again", stream.id, redis_last + 1, event.id - 1,
            extra={"stream_id": stream.id},
        )  # fmt: skip
        for n, ev in enumerate([*missing, event]):
            self._calls.submit((self._append, *self._append_call(stream, ev, gap=n == 0)))

    def _run_scripts(
        self,
        batch: Sequence[tuple[LuaScript, list[str], list[Any]]],
        patience: float | None = None,
    ) -> list[Any]:
        """Script calls that are waiting (every stream's appends; or the lease renewals due),
        in one pipeline: one round trip for all (each call's refusal is its own caller's).
        Retried whole while Redis cannot answer (an append that already ran answers 2 the
        second time), for ``patience`` seconds if given."""

        def queue(pipe: Pipeline) -> None:
            for script, keys, args in batch:
                script.queue(pipe, keys, args)

        results: list[Any] = self.conn.pipelined(queue, replies=True, patience=patience)
        return results

    def _refused(self, stream: Stream, exc: Exception) -> None:
        """Our write was refused: the stream ended elsewhere, another producer owns it, or Redis
        no longer knows it (restarted empty, flushed, evicted, a failover that lost writes)."""
        text = str(exc)
        if "LOST" in text or "FENCED" in text:
            # Not ours any more, or nobody's: end it here (for this worker's readers), unwritten.
            why = LOST_IN_REDIS if "LOST" in text else "producer fenced out"
            log.error("stream %s: %s; stopping", stream.id, why, extra={"stream_id": stream.id})
            end = Event(stream.last_event_id + 1, "error", lost_data(stream.id, why))
            stream.adopt_end(end)
        else:
            self._adopt_remote_end(stream)  # cancelled, or lost while we could not renew

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        meta = stream_keys(stream.id)[0]
        gen = self.owned[stream.id][1]
        try:
            self.conn.retrying(self._set_metadata, [meta], [gen, json.dumps(metadata)])
        except redis.ResponseError as exc:
            self._refused(stream, exc)
            raise StreamClosed(stream.id) from exc

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        _, events, _, channel = stream_keys(stream.id)
        try:
            pipe = self.conn.redis.pipeline(transaction=False)
            pipe.xtrim(events, minid=f"{up_to_id}-0")  # keeps up_to_id itself: never empty
            pipe.execute_command(self.conn.publish, channel, json.dumps({"persisted": up_to_id}))
            pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning(
                "stream %s: trimming Redis failed (%s); it will be trimmed later",
                stream.id,
                exc,
                extra={"stream_id": stream.id},
            )

    def _adopt_remote_end(self, stream: Stream) -> None:
        _, events, _, _ = stream_keys(stream.id)
        entries = self.conn.retrying(self.conn.redis.xrevrange, events, count=1)
        if entries:
            event = event_from_entry(*entries[0])
            if event.terminal:
                stream.adopt_end(event)

    def _renew_loop(self, stream: Stream, gen: str) -> None:
        meta, _, lease, _ = stream_keys(stream.id)
        pause = self.lease / 3
        while True:
            gevent.sleep(pause)
            if stream.finished:
                break
            try:
                state = self._renewals.submit((self._renew, [meta, lease], [gen, self._lease_ms]))
            except REDIS_ERRORS as exc:
                log.warning(
                    "stream %s: lease renewal failed (%s)",
                    stream.id,
                    exc,
                    extra={"stream_id": stream.id},
                )
                pause = 0.05  # it was retried for a third of the lease: go on trying
                continue
            pause = self.lease / 3
            state = state.decode() if isinstance(state, bytes) else state
            if state in ("fenced", "lost"):
                self._refused(stream, redis.ResponseError(state.upper()))
            elif state != StreamState.RUNNING.value:
                self._adopt_remote_end(stream)  # the durable flag says it ended (a lost message)
        self.owned.pop(stream.id, None)
        self.pubsub.unfollow(ends_channel(stream.id))

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

    def status(self, stream_id: str) -> dict[str, Any] | None:
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
        return {
            "stream_id": stream_id,
            "state": fields.get("state", "running"),
            "last_event_id": int(fields.get("last_id", 0)),
            "producer": fields.get("producer", ""),
            "created_at": float(fields.get("created_at", 0)),
            "finished_at": float(finished) if finished else None,
            "metadata": json.loads(fields.get("metadata", "{}")),
        }

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
