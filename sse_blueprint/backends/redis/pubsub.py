"""The worker's Redis Pub/Sub: the channels it follows, each with its handler.

On one Redis (or the primary a Sentinel names) that is one connection. In a Redis Cluster a
stream's channels are sharded: each lives on the primary that owns the stream's slot, and the
worker holds one ``SSUBSCRIBE`` connection per primary that serves a channel it follows (a
*lane*), so an event travels only from the shard that owns its stream.

Whatever fails (Redis gone, busy and refusing a subscription, a primary replaced, a slot moved
to another shard, which unsubscribes its channels), the lane reconnects with backoff, the
cluster's slots are read again, and each channel is subscribed again where it now lives; each
channel's ``on_subscribed`` then runs again (a mirror reads what it missed from the Redis
Stream).

Imports the connection and the backoff rule; it knows nothing of streams.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import redis

from ..._backoff import Backoff
from .connection import REDIS_ERRORS, RedisConnection

__all__ = ["PubSub"]

log = logging.getLogger("sse_blueprint")

Handler = Callable[[dict[str, Any]], None]


class PubSub:
    """Follows channels for this worker; a message's JSON goes to its channel's handler."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.handlers: dict[str, tuple[Handler, Callable[[], None] | None]] = {}
        self.confirmed: dict[str, gevent.event.Event] = {}
        self.lanes: dict[str, _Lane] = {}  # node name ("" for one Redis) -> its lane
        self._lane_of: dict[str, _Lane] = {}  # channel -> the lane that carries it

    def subscribe(
        self, channel: str, on_message: Handler, on_subscribed: Callable[[], None] | None = None
    ) -> gevent.event.Event:
        """Subscribe to ``channel``; the event returned is set once Redis confirms it."""
        self.handlers[channel] = (on_message, on_subscribed)
        confirmed = self.confirmed.setdefault(channel, gevent.event.Event())
        self._route(channel)
        return confirmed

    def unsubscribe(self, channel: str) -> None:
        self.handlers.pop(channel, None)
        self.confirmed.pop(channel, None)
        lane = self._lane_of.pop(channel, None)
        if lane is not None:
            lane.drop(channel)

    def _route(self, channel: str) -> None:
        """Subscribe ``channel`` on the lane of the node that serves it now."""
        try:
            node = self.conn.node_of(channel)
        except REDIS_ERRORS as exc:  # the cluster's slots are not known now: the old lane retries
            log.warning("Redis Cluster: no node for %s now (%s)", channel, exc)
            node = self._lane_of[channel].node if channel in self._lane_of else ""
        old = self._lane_of.get(channel)
        if old is not None and old.node != node:
            old.drop(channel)
        lane = self.lanes.get(node)
        if lane is None or lane.stopped:
            lane = self.lanes[node] = _Lane(self, node)
        self._lane_of[channel] = lane
        lane.add(channel)

    def rerouted(self, lane: _Lane) -> None:
        """``lane`` failed: read the cluster's slots again and move its channels where they
        live now (those that stay are subscribed again when it reconnects)."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.conn.refresh()
        for channel in list(lane.channels):
            if channel in self.handlers:
                self._route(channel)

    def moved(self, channel: str) -> None:
        """Redis unsubscribed a channel we follow: its slot moved to another shard."""
        if channel in self.handlers:
            confirmed = self.confirmed.get(channel)
            if confirmed is not None:
                confirmed.clear()
            with contextlib.suppress(*REDIS_ERRORS):
                self.conn.refresh()
            lane = self._lane_of.get(channel)
            if lane is not None:
                lane.channels.discard(channel)
            self._route(channel)

    def deliver(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        handlers = self.handlers.get(channel)
        kind = message["type"]
        if kind in ("subscribe", "ssubscribe"):
            confirmed = self.confirmed.get(channel)
            if confirmed is not None:
                confirmed.set()
            if handlers is not None and handlers[1] is not None:
                handlers[1]()  # (re)subscribed: after a reconnect, ours or redis-py's own
        elif kind in ("message", "smessage") and handlers is not None:
            handlers[0](json.loads(message["data"]))
        elif kind == "sunsubscribe" and self._lane_of.get(channel) is not None:
            lane = self._lane_of[channel]
            if channel in lane.channels and channel not in lane.leaving:
                self.moved(channel)


class _Lane:
    """One Pub/Sub connection (to one node of a cluster) and the channels it carries."""

    def __init__(self, pubsub: PubSub, node: str) -> None:
        self.pubsub = pubsub
        self.node = node
        self.sharded = pubsub.conn.cluster
        self.channels: set[str] = set()
        # Unsubscribed by us, how many times: their "sunsubscribe" replies are expected.
        self.leaving: Counter[str] = Counter()
        self._pending: list[tuple[bool, str]] = []  # (subscribe?, channel)
        self.stopped = False
        self._listener = gevent.spawn(self._listen)

    def add(self, channel: str) -> None:
        self.channels.add(channel)
        self._pending.append((True, channel))

    def drop(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.leaving[channel] += 1
            self._pending.append((False, channel))

    def _send(self, connection: Any, subscribe: bool, channels: list[str]) -> None:
        if self.sharded:  # one command per channel: a command's channels must share a slot
            for channel in channels:
                (connection.ssubscribe if subscribe else connection.sunsubscribe)(channel)
        else:
            (connection.subscribe if subscribe else connection.unsubscribe)(*channels)

    def _listen(self) -> None:
        backoff = Backoff(0.1, 5.0)
        connection: Any = None
        while True:
            try:
                connection = self.pubsub.conn.pubsub_for(self.node)
                self._pending.clear()
                self.leaving.clear()
                if self.channels:
                    self._send(connection, True, sorted(self.channels))
                while True:
                    while self._pending:
                        subscribe, channel = self._pending.pop(0)
                        self._send(connection, subscribe, [channel])
                    if not self.channels and not self._pending and self.node:
                        return self._stop()  # a cluster node that serves nothing we follow
                    message = connection.get_message(timeout=0.05)
                    if message is not None:
                        self.pubsub.deliver(message)
                        if message["type"] in ("unsubscribe", "sunsubscribe"):
                            self.leaving -= Counter([message["channel"].decode()])
                    backoff.reset()
            except Exception as exc:  # the worker's live events stop if this greenlet does
                delay = backoff.delay()
                where = f" ({self.node})" if self.node else ""
                if isinstance(exc, redis.exceptions.MovedError):  # resharded: go where it is
                    delay = min(delay, 0.2)
                    log.info("Redis Pub/Sub%s: a slot moved to %s; rerouting", where, exc.host)
                elif isinstance(exc, (*REDIS_ERRORS, OSError)):
                    log.warning(
                        "Redis Pub/Sub%s failed (%s); reconnecting in %.1fs", where, exc, delay
                    )
                else:
                    log.exception(
                        "Redis Pub/Sub%s reader failed; reconnecting in %.1fs", where, delay
                    )
                for channel in self.channels:
                    confirmed = self.pubsub.confirmed.get(channel)
                    if confirmed is not None:
                        confirmed.clear()
                with contextlib.suppress(Exception):
                    connection.close()
                gevent.sleep(delay)
                if self.node:
                    self.pubsub.rerouted(self)
                    if not self.channels:
                        return self._stop()
            finally:
                if self.stopped and connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()

    def _stop(self) -> None:
        self.stopped = True
        if self.pubsub.lanes.get(self.node) is self:
            del self.pubsub.lanes[self.node]
