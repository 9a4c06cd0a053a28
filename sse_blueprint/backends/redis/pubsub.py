"""The worker's one Redis Pub/Sub connection: the channels it follows, each with its handler.

Whatever fails (Redis gone, or busy and refusing a SUBSCRIBE), the reader reconnects with
backoff and subscribes again to every channel it follows; each channel's ``on_subscribed`` then
runs again (a mirror reads what it missed from the Redis Stream).

Imports the connection and the backoff rule; it knows nothing of streams.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import redis

from ..._backoff import Backoff
from .connection import RedisConnection

__all__ = ["PubSub"]

log = logging.getLogger("sse_blueprint")

Handler = Callable[[dict[str, Any]], None]


class PubSub:
    """Follows channels for this worker; a message's JSON goes to its channel's handler."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self._handlers: dict[str, tuple[Handler, Callable[[], None] | None]] = {}
        self._confirmed: dict[str, gevent.event.Event] = {}
        self._pending: list[tuple[str, str]] = []  # ("subscribe"|"unsubscribe", channel)
        self._pubsub: Any = None
        self._listener: gevent.Greenlet | None = None

    def follow(
        self, channel: str, on_message: Handler, on_subscribed: Callable[[], None] | None = None
    ) -> gevent.event.Event:
        """Subscribe to ``channel``; the event returned is set once Redis confirms it."""
        self._handlers[channel] = (on_message, on_subscribed)
        confirmed = self._confirmed.setdefault(channel, gevent.event.Event())
        self._pending.append(("subscribe", channel))
        self.start()
        return confirmed

    def unfollow(self, channel: str) -> None:
        self._handlers.pop(channel, None)
        self._confirmed.pop(channel, None)
        self._pending.append(("unsubscribe", channel))

    def start(self) -> None:
        if self._listener is None or self._listener.dead:
            self._listener = gevent.spawn(self._listen)

    def _listen(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                self._pubsub = self.conn.redis.pubsub()  # type: ignore[no-untyped-call]
                channels = list(self._handlers)
                self._pending.clear()
                if channels:
                    self._pubsub.subscribe(*channels)
                while True:
                    while self._pending:
                        action, channel = self._pending.pop(0)
                        getattr(self._pubsub, action)(channel)
                    message = self._pubsub.get_message(timeout=0.05)
                    if message is not None:
                        self._on_message(message)
                    backoff.reset()
            except Exception as exc:  # the worker's live events stop if this greenlet does
                delay = backoff.delay()
                if isinstance(exc, redis.RedisError | OSError):
                    log.warning("Redis Pub/Sub failed (%s); reconnecting in %.1fs", exc, delay)
                else:
                    log.exception("Redis Pub/Sub reader failed; reconnecting in %.1fs", delay)
                for event in self._confirmed.values():
                    event.clear()
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                gevent.sleep(delay)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        handlers = self._handlers.get(channel)
        if message["type"] == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None:
                confirmed.set()
            if handlers is not None and handlers[1] is not None:
                handlers[1]()  # (re)subscribed: after a reconnect, ours or redis-py's own
            return
        if message["type"] == "message" and handlers is not None:
            handlers[0](json.loads(message["data"]))
