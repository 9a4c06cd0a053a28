"""One worker's Redis connections, whatever the topology, and the one rule for retrying a call
Redis did not run.

``SSE_REDIS_URL`` names the topology by its scheme:

* ``redis://host:port/db`` (``rediss://``, ``unix://``): one Redis;
* ``redis+cluster://host:port[,host:port…]``: a Redis Cluster, found from any of those nodes;
  each stream's keys share a slot, and its channels are sharded (``SPUBLISH``/``SSUBSCRIBE``);
* ``redis+sentinel://host:port[,host:port…]/service[/db]``: the primary that those Sentinels
  name for ``service``, followed through failovers.

:class:`RedisConnection` holds the bounded pools (greenlets wait for a connection rather than
open more), :meth:`~RedisConnection.retrying` calls Redis and retries with backoff while it
cannot answer (:func:`is_transient`: a broken connection, a timeout, a busy or loading server, a
cluster that is failing over or moving a slot), within a patience, and
:meth:`~RedisConnection.pipelined` does the same for a round trip of many commands.
:class:`LuaScript` runs a script by its SHA, in a pipeline or alone, and loads it again where a
node does not know it (a restart, a promoted replica).

Imports redis, gevent and the backoff rule only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

import gevent
import redis
from redis.client import Pipeline
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException
from redis.sentinel import Sentinel, SentinelConnectionPool

from ..._backoff import Backoff
from ..._errors import Unavailable

__all__ = [
    "REDIS_ERRORS",
    "LuaScript",
    "RedisConnection",
    "RedisUnavailable",
    "is_transient",
]

# Error replies for a command Redis did not run because it cannot now (not a refusal).
_BUSY_REPLIES = ("BUSY ", "TRYAGAIN ", "MASTERDOWN ", "CLUSTERDOWN ", "MOVED ", "ASK ", "LOADING ")

#: What a call to Redis may raise: redis-py's cluster client raises some errors of its own kind.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

_SCHEMES = ("redis", "rediss", "unix")


class RedisUnavailable(Unavailable, redis.ConnectionError):
    """Redis could not answer for as long as a call could wait (the engine's
    :class:`Unavailable`, and a redis-py error for this package's own handlers)."""


def is_transient(exc: BaseException) -> bool:
    """Whether Redis did not run the call and will answer it later: the connection broke or
    timed out, Redis is busy (another client's long script, loading its data set, a failover)
    and refused it untried, or a cluster is between two shapes (a slot moving, a primary
    being replaced, its topology not known yet)."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # LOADING is one of them
        return True
    if isinstance(exc, ClusterError | RedisClusterException):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # In a pipeline redis-py prefixes the reply: "Command # 1 (HSET ...) of pipeline caused
    # error: BUSY ...".
    reply = str(exc).rpartition(" of pipeline caused error: ")[2]
    return reply.startswith(_BUSY_REPLIES) or isinstance(
        exc, redis.exceptions.TryAgainError | redis.exceptions.AskError
    )


def _hosts(netloc: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """``user:password@host:port,host:port`` → credentials, and the hosts."""
    userinfo, _, hostlist = netloc.rpartition("@")
    credentials: dict[str, Any] = {}
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if colon:
            credentials["password"] = unquote(password)
        if user:
            credentials["username"] = unquote(user)
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"SSE_REDIS_URL: {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    return credentials, hosts


class _SentinelBlockingPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """The primary's pool behind a Sentinel, which waits for a free connection (redis-py's own
    raises "Too many connections" once ``max_connections`` callers hold one)."""


def connect(url: str, **options: Any) -> tuple[Any, str]:
    """The client that ``url`` names (see the module docstring), and its topology: ``"single"``,
    ``"cluster"`` or ``"sentinel"``. ``options`` go to every connection."""
    scheme, sep, rest = url.partition("://")
    base, _, topology = scheme.partition("+")
    if not sep or base not in _SCHEMES or topology not in ("", "cluster", "sentinel"):
        raise ValueError(
            f"SSE_REDIS_URL {url!r}: use redis://host:port/db, redis+cluster://host:port,… "
            "or redis+sentinel://host:port,…/service"
        )
    if not topology:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=16, timeout=10, **options)
        return redis.Redis(connection_pool=pool), "single"
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    credentials, hosts = _hosts(netloc)
    if base == "rediss":
        options["ssl"] = True
    if topology == "cluster":
        (host, port), others = hosts[0], hosts[1:]
        cluster = RedisCluster(
            # (A URL, not only startup nodes: redis-py gives each node a pool of
            # connection_pool_class only when it was given one; else a pool that raises "Too
            # many connections" instead of waiting for one.)
            url=f"redis://[{host}]:{port}" if ":" in host else f"redis://{host}:{port}",
            startup_nodes=[ClusterNode(h, p) for h, p in others],  # type: ignore[no-untyped-call]
            connection_pool_class=redis.BlockingConnectionPool,
            max_connections=16,
            **credentials,
            **options,
        )
        return cluster, "cluster"
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"SSE_REDIS_URL {url!r}: name the service: …/service")
    # (As Any: redis-py types these calls in some versions and not in others.)
    sentinel_class: Any = Sentinel
    sentinel = sentinel_class(hosts, sentinel_kwargs=dict(options), **options)
    primary = sentinel.master_for(
        service,
        connection_pool_class=_SentinelBlockingPool,
        db=int(db or 0),
        max_connections=16,
        timeout=10,
        **credentials,
        **options,
    )
    return primary, "sentinel"


#: A script call: the script, its keys and its arguments.
ScriptCall = tuple["LuaScript | BoundScript", Sequence[str], Sequence[Any]]


class RedisConnection:
    """The client of ``url`` and its retry rule; ``patience``: seconds a call may wait."""

    def __init__(self, url: str, *, patience: float) -> None:
        # Blocking reads stay shorter than the socket timeout; dead connections are noticed by
        # health checks. Each connection is named for its worker, so CLIENT LIST tells whose.
        self.redis, self.topology = connect(
            url,
            client_name=f"sse-blueprint:{socket.gethostname()}:{os.getpid()}",
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=15,
        )
        self.cluster = self.topology == "cluster"
        #: The command that publishes on a stream's channel: sharded in a cluster, so that an
        #: event goes only to the shard that owns its stream.
        self.publish = "SPUBLISH" if self.cluster else "PUBLISH"
        self.url = url
        self.patience = patience
        self.scripts: list[LuaScript] = []

    def script(self, source: str) -> LuaScript:
        script = LuaScript(self, source)
        self.scripts.append(script)
        return script

    def load_scripts(self) -> None:
        """Load every script (on every primary of a cluster)."""
        for script in self.scripts:
            self.redis.script_load(script.source)

    def node_of(self, channel: str) -> str:
        """The name of the node that serves ``channel`` ("" for one Redis)."""
        if not self.cluster:
            return ""
        node = self.redis.nodes_manager.get_node_from_slot(self.redis.keyslot(channel))
        return str(node.name)

    def pubsub_for(self, node: str) -> Any:
        """A Pub/Sub connection to ``node`` (from :meth:`node_of`)."""
        if not self.cluster:
            return self.redis.pubsub()
        found = self.redis.get_node(node_name=node)
        if found is None:
            raise redis.ConnectionError(f"{node} is not a node of the cluster any more")
        pubsub = self.redis.get_redis_connection(found).pubsub()

        def resubscribe() -> None:
            # redis-py reconnects by itself and subscribes again to every channel in one
            # SSUBSCRIBE, which a cluster refuses (CROSSSLOT) unless they share a slot.
            for channel in list(pubsub.shard_channels):
                pubsub.ssubscribe(channel)

        pubsub._resubscribe_shard_channels = resubscribe
        return pubsub

    def refresh(self) -> None:
        """Read a cluster's slots and nodes again (after a failover or a slot moved)."""
        if self.cluster:
            self.redis.nodes_manager.initialize()

    def retrying(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call Redis; while it cannot answer (see :func:`is_transient`) retry with backoff for
        ``patience`` seconds, then raise (a cluster client's own errors as
        :class:`redis.ConnectionError`)."""
        return self._retry(lambda: func(*args, **kwargs), self.patience)

    def _retry(self, call: Callable[[], Any], patience: float) -> Any:
        backoff, deadline = Backoff(0.05, 1.0), time.monotonic() + patience
        while True:
            try:
                return call()
            except REDIS_ERRORS as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() + backoff.peek() > deadline:
                    raise RedisUnavailable(f"Redis: {exc}") from exc
                gevent.sleep(backoff.delay())

    def pipelined(
        self,
        build: Callable[[Pipeline], None],
        *,
        transaction: bool = False,
        replies: bool = False,
        patience: float | None = None,
    ) -> Any:
        """Run the commands ``build`` queues, in one round trip, retried as :meth:`retrying`
        does. Each attempt builds a new pipeline: one forgets its commands when it runs, sent
        or not, and retrying it would run nothing. With ``replies``, a command's error is its
        reply (an exception instance in the list) rather than raised, unless Redis could not
        run it (see :func:`is_transient`) or did not know a script: then the whole pipeline is
        retried (the scripts loaded first). ``patience``: how long to retry, if not the
        connection's."""

        def run() -> Any:
            pipe = self.redis.pipeline(transaction=transaction)
            try:
                build(pipe)
                results = pipe.execute(raise_on_error=not replies)
            except redis.exceptions.NoScriptError:
                self.load_scripts()
                raise redis.exceptions.TryAgainError("scripts loaded again") from None
            finally:
                pipe.reset()
            if replies:
                self._check_replies(results)
            return results

        return self._retry(run, self.patience if patience is None else patience)

    def run_scripts(self, calls: Sequence[ScriptCall], *, patience: float | None = None) -> Any:
        """Script calls in one round trip, each reply (or error reply) its own caller's, retried
        as :meth:`pipelined` does (with ``replies``). On one Redis (or a Sentinel's primary) the
        calls are packed here and sent on one pooled connection: redis-py's pipeline spends
        most of an append's time encoding its arguments one by one. A cluster's go through
        redis-py's cluster pipeline, which routes each call to its slot's node."""
        if self.cluster:

            def queue(pipe: Pipeline) -> None:
                for script, keys, args in calls:
                    script.queue(pipe, keys, args)

            return self.pipelined(queue, replies=True, patience=patience)
        return self._retry(
            lambda: self._run_packed([script.pack(keys, args) for script, keys, args in calls]),
            self.patience if patience is None else patience,
        )

    def _run_packed(self, commands: list[bytes]) -> list[Any]:
        pool = self.redis.connection_pool
        connection = pool.get_connection()
        replies: list[Any] = []
        try:
            connection.send_packed_command([b"".join(commands)])
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            connection.disconnect()  # (replies may be left unread on it)
            raise
        finally:
            pool.release(connection)
        self._check_replies(replies)
        return replies

    def _check_replies(self, replies: list[Any]) -> None:
        """Raise, for the whole round trip to be retried, if a reply says Redis did not run a
        call: it did not know a script (loaded now), or it could not (:func:`is_transient`)."""
        for reply in replies:
            if isinstance(reply, redis.exceptions.NoScriptError):
                self.load_scripts()
                raise redis.exceptions.TryAgainError("scripts loaded again")
            if isinstance(reply, redis.RedisError) and is_transient(reply):
                raise reply


def _resp(parts: Sequence[Any]) -> bytes:
    """A command in Redis's wire protocol (RESP): str (UTF-8), bytes, int or float parts."""
    return b"*%d\r\n" % len(parts) + _bulk(parts)


def _bulk(parts: Sequence[Any]) -> bytes:
    """``parts`` as RESP bulk strings, one after the other (a command's, after its header)."""
    out = []
    for part in parts:
        kind = type(part)
        if kind is str:
            part = part.encode()
        elif kind is int:
            part = b"%d" % part
        elif kind is float:
            part = repr(part).encode()
        elif kind is not bytes:
            part = _encoded(part)  # (a subclass: a str enum's member, say)
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return b"".join(out)


def _encoded(part: object) -> bytes:
    if isinstance(part, str):
        return part.encode()
    if isinstance(part, int) and not isinstance(part, bool):
        return b"%d" % part
    if isinstance(part, float):
        return repr(part).encode()
    if isinstance(part, bytes):
        return bytes(part)
    raise redis.DataError(f"cannot send {type(part).__name__} to Redis")


class LuaScript:
    """A Lua script, run by its SHA (``EVALSHA``): alone, or queued in a pipeline."""

    def __init__(self, conn: RedisConnection, source: str) -> None:
        self.conn = conn
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.conn.redis.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.conn.load_scripts()
            return self.conn.redis.evalsha(self.sha, len(keys), *keys, *args)

    def pack(self, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        """The call as it goes on the wire (see :meth:`RedisConnection.run_scripts`)."""
        return _resp(("EVALSHA", self.sha, len(keys), *keys, *args))

    def bind(self, keys: Sequence[str], fixed: Sequence[Any]) -> BoundScript:
        """This script with ``keys`` and its first arguments ``fixed`` (the same in every
        call: a stream's append), encoded once."""
        return BoundScript(self, keys, fixed)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Queue the call in ``pipe`` (a NOSCRIPT reply: see :meth:`RedisConnection.pipelined`).
        Not redis-py's own script support: it asks ``SCRIPT EXISTS`` before every pipeline,
        one more round trip, and a cluster pipeline refuses it. In a cluster the call names its
        node (from the slot map it holds): redis-py 8's cluster pipeline would otherwise ask a
        node for the keys of every ``EVALSHA`` (``COMMAND GETKEYS``), a round trip per call; a
        ``MOVED`` reply is still followed, the call sent again without the node."""
        options = (
            {"target_nodes": self.conn.redis.get_node_from_key(keys[0])}
            if self.conn.cluster
            else {}
        )
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args, **options)  # type: ignore[no-untyped-call]


class BoundScript:
    """A :class:`LuaScript` with its keys and first arguments fixed and already encoded: a
    call then encodes only the rest. It is called as the script is, with no keys
    (``(bound, (), rest)`` in :meth:`RedisConnection.run_scripts`)."""

    __slots__ = ("_count", "_head", "fixed", "keys", "script")

    def __init__(self, script: LuaScript, keys: Sequence[str], fixed: Sequence[Any]) -> None:
        self.script = script
        self.keys = tuple(keys)
        self.fixed = tuple(fixed)
        head = ("EVALSHA", script.sha, len(keys), *keys, *fixed)
        self._head = _bulk(head)
        self._count = len(head)

    def pack(self, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        return b"*%d\r\n" % (self._count + len(args)) + self._head + _bulk(args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Any]) -> None:
        self.script.queue(pipe, self.keys, (*self.fixed, *args))
