"""Mirrors: this worker's followers of streams that other workers run.

A stream with readers on a worker other than its owner gets one *mirror* there (a
:class:`~sse_blueprint.engine.Mirror`: a stream without a producer), filled from ``XRANGE`` once
its channel subscription is confirmed, then fed by the published events (a gap in ids is filled with
``XRANGE``; a mirror that missed what Redis has since trimmed is replaced, its readers resuming
from the store). All of that worker's readers follow the mirror with the engine's usual cursors: the
commands per event do not grow with the clients. A watchdog ends a mirrored stream whose owner's
lease lapsed ("producer lost", once, atomically), takes the end of one that Redis lost from the
store, and drops mirrors nobody reads.

Imports the engine, the connection, the Pub/Sub reader and the scripts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from ... import _observe
from ..._event import DURABLE
from ...engine import Event, Mirror, lost, lost_data
from ...storage.records import BlockStore
from .connection import REDIS_ERRORS, RedisConnection, RedisUnavailable
from .pubsub import PubSub
from .scripts import LOST_IN_REDIS, event_from_entry, stream_keys

__all__ = ["Mirrors"]

#: ``end(stream_id, state, data, if_lease_gone=...)``: the backend's end from any worker.
Ender = Callable[..., "str | None"]


class Mirrors:
    """This worker's mirrors, by stream id (see the module docstring)."""

    def __init__(
        self,
        conn: RedisConnection,
        pubsub: PubSub,
        *,
        lease: float,
        make_mirror: Callable[[str], Mirror] | None,
        store: BlockStore | None,
        end: Ender,
    ) -> None:
        self.conn = conn
        self.pubsub = pubsub
        self.lease = lease
        self.make_mirror = make_mirror
        self.store = store  # where a mirror learns how a stream that Redis lost ended
        self._end = end
        self.streams: dict[str, Mirror] = {}
        self._making: dict[str, gevent.event.AsyncResult] = {}  # mirrors being made
        self._early: dict[str, list[Event]] = {}  # events that came before the first fill
        self._filling: dict[str, bool] = {}  # refills running: whether another is due after
        self._watchdog: gevent.Greenlet | None = None

    def get(self, stream_id: str) -> Mirror | None:
        """This worker's mirror of a stream that another worker runs, or None if unknown.

        The mirror is handed out only once it is filled and following: the subscription is
        confirmed first, then the Redis Stream is read, then what was published meanwhile is
        applied, so it misses nothing and holds nothing twice. Readers that ask while it is
        being made wait for that one mirror (the pending result is registered before the first
        call to Redis, so two readers can never make two).
        """
        pending = self._making.get(stream_id)
        if pending is not None:
            found: Mirror | None = pending.get(timeout=15)
            return found
        mirror = self.streams.get(stream_id)
        if mirror is not None:
            return mirror
        pending = self._making[stream_id] = gevent.event.AsyncResult()
        try:
            mirror = self._make(stream_id)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set(mirror)
            return mirror
        finally:
            del self._making[stream_id]

    def release(self) -> int:
        """Shutdown: end the responses of every reader of a mirror (they resume elsewhere)."""
        return sum(mirror.release_readers() for mirror in list(self.streams.values()))

    def _make(self, stream_id: str) -> Mirror | None:
        meta, _, _, channel = stream_keys(stream_id)
        producer, metadata = self.conn.retrying(
            self.conn.redis.hmget, meta, ["producer", "metadata"]
        )
        if self.make_mirror is None or producer is None:
            return None
        stream = self.make_mirror(stream_id)
        stream.producer_name = producer.decode()
        stream.metadata = json.loads(metadata) if metadata else {}
        self._early[stream_id] = []
        self._start_watchdog()
        try:
            confirmed = self.pubsub.subscribe(
                channel, lambda payload: self._on_message(stream, payload),
                lambda: self._on_subscribed(stream),
            )  # fmt: skip
            if not confirmed.wait(10):
                raise RedisUnavailable("Redis did not confirm the subscription in time")
            self._fill(stream, first=True)
        except BaseException:
            self.pubsub.unsubscribe(channel)
            self._early.pop(stream_id, None)
            raise
        self.streams[stream_id] = stream
        for event in self._early.pop(stream_id, []):  # (no switch until handed out)
            self._deliver(stream, event)
        return stream

    def _on_subscribed(self, stream: Mirror) -> None:
        if stream.id not in self._early:
            # (Re)subscribed after a reconnect: what was published meanwhile is in the Redis
            # Stream.
            self._refill(stream)

    def _on_message(self, stream: Mirror, payload: dict[str, Any]) -> None:
        if "persisted" in payload:
            stream.trim_persisted(payload["persisted"])
            return
        event = Event(payload["id"], payload["e"], payload["d"], payload.get("r", DURABLE))
        early = self._early.get(stream.id)
        if early is not None:
            early.append(event)  # the mirror is still being filled
            return
        self._deliver(stream, event)

    def _fill(self, stream: Mirror, *, first: bool = False) -> None:
        """Bring a mirror up to date from the Redis Stream (first, after a gap, a reconnect)."""
        _, events, _, _ = stream_keys(stream.id)
        start = f"{stream.last_event_id + 1}-0"
        entries = self.conn.retrying(self.conn.redis.xrange, events, min=start)
        found = [event_from_entry(*entry) for entry in entries]
        # Where the events Redis holds run on without a hole: what came before was persisted
        # (trimmed after the owner's writes; or written again by the owner past what it no
        # longer buffered, after a failover lost it: the script trims before that).
        begin = 0
        for n in range(1, len(found)):
            if found[n].id > found[n - 1].id + 1:
                begin = n
        if first and found:
            # A reader older than that is caught up from the store (the usual two tiers).
            stream.follow_from(found[begin].id)
            found = found[begin:]
        elif found and (begin or found[0].id > stream.last_event_id + 1):
            self._restart(stream)
            return
        for event in found:
            stream.ingest(event)

    def _restart(self, stream: Mirror) -> None:
        """The mirror missed events that Redis has since trimmed (they are persisted): it
        cannot be filled from Redis. It is dropped and retired: its readers (and any that
        found it and subscribe later) reconnect from their last ids to a new mirror, which
        catches them up from the store first."""
        if self._drop(stream):
            _observe.stream_log(
                logging.WARNING,
                stream.id,
                "this worker's mirror missed events Redis no longer has; its readers resume "
                "from the store",
            )

    def _drop(self, stream: Mirror) -> bool:
        """Stop following ``stream`` and retire it (a reader that found it and has yet to
        subscribe resumes then). False if it is not this worker's mirror any more."""
        if self.streams.get(stream.id) is not stream:
            return False
        del self.streams[stream.id]
        self.pubsub.unsubscribe(stream_keys(stream.id)[3])
        stream.retire()
        return True

    def _deliver(self, stream: Mirror, event: Event) -> None:
        if event.id > stream.last_event_id + 1:
            self._refill(stream)  # a gap: read it from the Redis Stream
        else:
            stream.ingest(event)

    def _refill(self, stream: Mirror) -> None:
        """Fill a mirror from the Redis Stream on a greenlet of its own, one at a time per
        stream: gaps seen while a fill runs make one more fill after it, not one each."""
        if stream.id in self._filling:
            self._filling[stream.id] = True
            return
        self._filling[stream.id] = False
        gevent.spawn(self._refilling, stream)

    def _refilling(self, stream: Mirror) -> None:
        try:
            again = True
            while again and not stream.finished and self.streams.get(stream.id) is stream:
                self._filling[stream.id] = False
                try:
                    self._fill(stream)
                except REDIS_ERRORS as exc:
                    # Redis is away longer than the patience (a failover): the next
                    # confirmed subscription or published gap fills it; the watchdog
                    # ends it if its owner is gone.
                    _observe.stream_log(
                        logging.WARNING,
                        stream.id,
                        "could not fill this worker's mirror from Redis: %s",
                        exc,
                    )
                    return
                again = self._filling[stream.id]
        finally:
            self._filling.pop(stream.id, None)

    def _start_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.dead:
            self._watchdog = gevent.spawn(self._watch)

    def _watch(self) -> None:
        """Lease watchdog and mirror housekeeping for the streams this worker follows."""
        idle: dict[str, float] = {}
        unknown: dict[str, float] = {}  # mirrored streams Redis has lost: since when
        while True:
            gevent.sleep(max(self.lease / 2, 0.2))
            now = time.monotonic()
            for stream_id, stream in list(self.streams.items()):
                if not stream.finished and stream_id not in self._early:
                    try:
                        lease = stream_keys(stream_id)[2]
                        if not self.conn.redis.exists(lease):
                            gone = lost_data(stream_id)
                            ended = self._end(stream_id, "error", gone, if_lease_gone=True)
                            if ended is None:  # Redis lost the stream: its end is in the store
                                self._end_from_store(stream, unknown.setdefault(stream_id, now))
                            elif ended != "running":
                                # Ended (now, or while we were not listening): take the end.
                                self._fill(stream)
                    except REDIS_ERRORS:
                        continue
                    except Exception:
                        _observe.stream_log(
                            logging.ERROR,
                            stream_id,
                            "could not end a stream Redis lost; retrying",
                            exc_info=True,
                        )
                        continue
                if stream.finished:
                    unknown.pop(stream_id, None)
                if stream.subscriber_count:
                    idle.pop(stream_id, None)
                elif now - idle.setdefault(stream_id, now) > max(30.0, self.lease):
                    idle.pop(stream_id, None)
                    self._drop(stream)

    def _end_from_store(self, mirror: Mirror, missing_since: float) -> None:
        """End a mirror of a stream that Redis no longer knows (restarted empty, flushed,
        evicted, a failover that lost writes), as the store says it ended.

        The owner, refused at its next write or lease renewal, ends the stream and saves its end;
        a mirror takes that end. If the store still says "running" two leases on, the owner is
        gone too: the stream is ended there as lost (the first end saved wins).
        """
        store = self.store
        record = store.load_stream(mirror.id) if store is not None else None
        if record is None or record.terminal is None:
            if time.monotonic() - missing_since < 2 * self.lease:
                return  # give the owner time to notice and save its end
            if record is not None and store is not None:
                store.save(lost(record), [])
                record = store.load_stream(mirror.id)
        if record is not None and record.terminal is not None and record.terminal_id is not None:
            end = Event(record.terminal_id, record.terminal, record.terminal_data or {})
        else:  # no store, or it never heard of the stream
            end = Event(mirror.last_event_id + 1, "error", lost_data(mirror.id, LOST_IN_REDIS))
        _observe.stream_log(
            logging.WARNING, mirror.id, "Redis lost this stream; it ended with %s", end.event
        )
        mirror.ingest(end)
