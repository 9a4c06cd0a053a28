"""One worker's Redis connections, and the one rule for retrying a call Redis did not run.

:class:`RedisConnection` holds the bounded pool (greenlets wait for a connection rather than open
more), :meth:`~RedisConnection.retrying` calls Redis and retries with backoff while it cannot
answer (:func:`is_transient`: a broken connection, a timeout, a busy or loading server), within
a patience, and :meth:`~RedisConnection.pipelined` does the same for a round trip of many
commands.

Imports redis, gevent and the backoff rule only.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import redis
from redis.client import Pipeline

from ..._backoff import Backoff

__all__ = ["RedisConnection", "is_transient"]

# Error replies for a command Redis did not run because it cannot now (not a refusal).
_BUSY_REPLIES = ("BUSY ", "TRYAGAIN ", "MASTERDOWN ")


def is_transient(exc: BaseException) -> bool:
    """Whether Redis did not run the call and will answer it later: the connection broke or
    timed out, or Redis is busy (another client's long script, loading its data set, a
    failover) and refused it untried."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # LOADING is one of them
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # In a pipeline redis-py prefixes the reply: "Command # 1 (HSET ...) of pipeline caused
    # error: BUSY ...".
    return str(exc).rpartition(" of pipeline caused error: ")[2].startswith(_BUSY_REPLIES)


class RedisConnection:
    """The client of ``url`` and its retry rule; ``patience``: seconds a call may wait."""

    def __init__(self, url: str, *, patience: float) -> None:
        # Blocking reads stay shorter than the socket timeout; dead connections are noticed by
        # health checks. Each connection is named for its worker, so CLIENT LIST tells whose.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            client_name=f"sse-blueprint:{socket.gethostname()}:{os.getpid()}",
            max_connections=16,
            timeout=10,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=15,
        )
        self.redis = redis.Redis(connection_pool=pool)
        self.url = url
        self.patience = patience

    def retrying(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call Redis; while it cannot answer (see :func:`is_transient`) retry with backoff for
        ``patience`` seconds, then raise."""
        backoff, deadline = Backoff(0.05, 1.0), time.monotonic() + self.patience
        while True:
            try:
                return func(*args, **kwargs)
            except redis.RedisError as exc:
                if not is_transient(exc) or time.monotonic() + backoff.peek() > deadline:
                    raise
                gevent.sleep(backoff.delay())

    def pipelined(
        self,
        build: Callable[[Pipeline], None],
        *,
        transaction: bool = False,
        replies: bool = False,
    ) -> Any:
        """Run the commands ``build`` queues, in one round trip, retried as :meth:`retrying`
        does. Each attempt builds a new pipeline: one forgets its commands when it runs, sent
        or not, and retrying it would run nothing. With ``replies``, a command's error is its
        reply (an exception instance in the list) rather than raised, unless Redis could not
        run it (see :func:`is_transient`): then the whole pipeline is retried."""

        def run() -> Any:
            pipe = self.redis.pipeline(transaction=transaction)
            try:
                build(pipe)
                results = pipe.execute(raise_on_error=not replies)
            finally:
                # A pipeline with scripts loads them before the part of execute() that gives
                # its connection back: when that fails (BUSY), only reset() gives it back.
                pipe.reset()
            for result in results if replies else ():
                if isinstance(result, redis.RedisError) and is_transient(result):
                    raise result
            return results

        return self.retrying(run)
