"""The owner's side of this worker's Redis streams (:class:`Owners`): the claim with its
generation (fencing), the appends of every stream batched in one pipeline, the lease renewals
batched apart, and what a refused write means (ended elsewhere, fenced out, lost in Redis).

Imports the engine, the wire module and this package's connection and scripts; not the mirrors,
the client counter or the web layer.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import gevent
import redis
from redis.client import Pipeline

from ... import _observe, _wire
from ..._batch import Batcher
from ..._event import DURABLE
from ...engine import Appended, Event, Stream, StreamClosed, StreamState, lost_data
from .connection import REDIS_ERRORS, BoundScript, RedisConnection, ScriptCall
from .pubsub import PubSub
from .scripts import (
    APPEND,
    LOST_IN_REDIS,
    RENEW,
    SET_METADATA,
    ends_channel,
    event_from_entry,
    stream_keys,
)

__all__ = ["Owners"]


class Owners:
    """The streams this worker produces, written to Redis through ``conn``."""

    def __init__(
        self, conn: RedisConnection, pubsub: PubSub, *, lease: float, retention: float
    ) -> None:
        self.conn = conn
        self.pubsub = pubsub
        self.lease = lease
        self._lease_ms = int(lease * 1000)
        self.retention = retention
        self.append_script = conn.script(APPEND)
        self._renew = conn.script(RENEW)
        self._set_metadata = conn.script(SET_METADATA)
        # Owners' appends, and apart from them their lease renewals, batched across streams:
        # each caller waits for its own outcome. (Apart: a renewal must not wait behind appends
        # that are retrying while Redis is away, or the lease lapses just as Redis is back.)
        self._calls: Batcher[ScriptCall, Any] = Batcher(self._run_scripts)
        # (Retried for a third of a lease at most: the next round comes soon anyway.)
        self._renewals: Batcher[ScriptCall, Any] = Batcher(
            partial(self._run_scripts, patience=lease / 3)
        )
        # stream id -> (stream, generation, its append script bound to its keys)
        self.streams: dict[str, tuple[Stream, str, BoundScript]] = {}

    def claim(self, stream: Stream) -> None:
        meta, events, lease, channel = stream_keys(stream.id)
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
            pipe.set(lease, gen, px=self._lease_ms)

        self.conn.pipelined(start, transaction=True)
        append = self.append_script.bind(
            [meta, events, lease], [gen, int(self.retention), channel, self.conn.publish]
        )
        self.streams[stream.id] = (stream, gen, append)
        # To hear of a cancel made elsewhere; not the stream's own channel, which would bring it
        # every event it appends (the Pub/Sub reader parsing them took a quarter of its time).
        self.pubsub.subscribe(
            ends_channel(stream.id), lambda payload: self._ended_elsewhere(stream, payload)
        )
        gevent.spawn(self._renew_loop, stream, gen)

    def _ended_elsewhere(self, stream: Stream, payload: dict[str, Any]) -> None:
        event = Event(payload["id"], payload["e"], payload["d"])
        if event.terminal:
            stream.adopt_end(event)

    def append(self, stream: Stream, events: Sequence[Event], done: Appended) -> None:
        """One call for ``events`` (one producer's, of one pause), in the next round trip."""
        call = self._append_call(stream, events)
        self._calls.enqueue(call, partial(self._answered, stream, events, done))

    def _answered(
        self,
        stream: Stream,
        events: Sequence[Event],
        done: Appended,
        outcome: object,
    ) -> None:
        # (On the batch's writer: nothing here may block; a refusal is handled on its own.)
        if isinstance(outcome, redis.ResponseError):
            gevent.spawn(self._after_refusal, stream, events, done, outcome)
        else:
            done(outcome if isinstance(outcome, BaseException) else None)

    def _after_refusal(
        self,
        stream: Stream,
        events: Sequence[Event],
        done: Appended,
        exc: redis.ResponseError,
    ) -> None:
        """Redis refused the call: write again what a failover lost (then it is written), or
        learn how the stream ended (then it is refused)."""
        outcome: BaseException | None = RuntimeError("the refusal could not be handled")
        try:
            if str(exc).startswith("GAP "):
                try:
                    self._fill_gap(stream, int(str(exc).split()[1]), events)
                    outcome = None
                    return
                except redis.ResponseError as again:
                    exc = again
            self._refused(stream, exc)
            outcome = StreamClosed(stream.id)
        except Exception as failure:
            outcome = failure
        finally:
            done(outcome)

    def _append_call(
        self, stream: Stream, events: Sequence[Event], *, gap: bool = False
    ) -> ScriptCall:
        append = self.streams[stream.id][2]
        last = events[-1]
        args: list[Any] = [last.event if last.terminal else "", time.time(), "1" if gap else ""]
        for ev in events:
            message = _wire.relay_message(ev.id, ev.event, ev.json, own=True, replay=ev.replay)
            args += (ev.id, ev.event, ev.json, message, "" if ev.replay == DURABLE else ev.replay)
        return append, (), args

    def _fill_gap(self, stream: Stream, redis_last: int, events: Sequence[Event]) -> None:
        """Redis has lost events it acknowledged (a failover promoted a replica that had not
        got them yet): write them again from this owner's buffer, then ``events``. What the
        buffer no longer holds was persisted first: readers get it from the store."""
        first = events[0].id
        missing = [ev for ev in stream.buffered_after(redis_last) if ev.id < first]
        _observe.stream_log(
            logging.WARNING,
            stream.id,
            "Redis lacks events %d-%d it had acknowledged (a failover?); writing them again",
            redis_last + 1,
            first - 1,
        )
        self._calls.submit(self._append_call(stream, [*missing, *events], gap=True))

    def _run_scripts(
        self,
        batch: Sequence[ScriptCall],
        patience: float | None = None,
    ) -> list[Any]:
        """Script calls that are waiting (every stream's appends; or the lease renewals due),
        in one pipeline: one round trip for all (each call's refusal is its own caller's).
        Retried whole while Redis cannot answer (an append that already ran answers 2 the
        second time), for ``patience`` seconds if given."""
        results: list[Any] = self.conn.run_scripts(batch, patience=patience)
        return results

    def _refused(self, stream: Stream, exc: Exception) -> None:
        """Our write was refused: the stream ended elsewhere, another producer owns it, or Redis
        no longer knows it (restarted empty, flushed, evicted, a failover that lost writes)."""
        text = str(exc)
        if "LOST" in text or "FENCED" in text:
            # Not ours any more, or nobody's: end it here (for this worker's readers), unwritten.
            why = LOST_IN_REDIS if "LOST" in text else "producer fenced out"
            _observe.stream_log(logging.ERROR, stream.id, "%s; stopping", why)
            end = Event(stream.last_event_id + 1, "error", lost_data(stream.id, why))
            stream.adopt_end(end)
        else:
            self._adopt_remote_end(stream)  # cancelled, or lost while we could not renew

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        meta = stream_keys(stream.id)[0]
        gen = self.streams[stream.id][1]
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
            _observe.stream_log(
                logging.WARNING,
                stream.id,
                "trimming Redis failed (%s); it will be trimmed later",
                exc,
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
                _observe.stream_log(logging.WARNING, stream.id, "lease renewal failed (%s)", exc)
                pause = 0.05  # it was retried for a third of the lease: go on trying
                continue
            pause = self.lease / 3
            state = state.decode() if isinstance(state, bytes) else state
            if state in ("fenced", "lost"):
                self._refused(stream, redis.ResponseError(state.upper()))
            elif state != StreamState.RUNNING.value:
                self._adopt_remote_end(stream)  # the durable flag says it ended (a lost message)
        self.streams.pop(stream.id, None)
        self.pubsub.unsubscribe(ends_channel(stream.id))
