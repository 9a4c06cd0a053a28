"""Run as ``python -m tests.helpers.redis_lost_reply REDIS_URL``: appends whose reply is lost.

Redis can run an append and stop (or lose the connection) before its reply arrives; the owner
then retries an append that is already there. Another case: a Redis that refuses every append.
Neither may leave a stream "running forever". And the count of clients per address, through an
outage and through a Redis busy with another client's script, may lose no pool connection.
A separate process for gevent's patched sockets (as in a gunicorn gevent worker); it prints
what happened as JSON for the test to check.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402
import redis.client  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from sse_blueprint import ProducerContext, Stream  # noqa: E402
from sse_blueprint.backends.redis import RedisBackend  # noqa: E402
from sse_blueprint.backends.redis.connection import BoundScript  # noqa: E402
from tests.helpers.redis_busy import busy_redis  # noqa: E402


def producer(ctx: ProducerContext) -> None:
    for i in range(10):
        ctx.text(0, f"{i} ")


Append = Callable[[int, Callable[[], Any], Callable[[], Any]], Any]


HOOKS: dict[int, Callable[[BoundScript, Any, Any], Any]] = {}  # by the append script's id
_pack = BoundScript.pack


def _hooked_pack(self: BoundScript, keys: Any, args: Any) -> Any:
    hook = HOOKS.get(id(self.script))
    return _pack(self, keys, args) if hook is None else hook(self, keys, args)


BoundScript.pack = _hooked_pack  # type: ignore[method-assign]


def started_with(backend: RedisBackend, append: Append) -> Stream:
    """A stream of :func:`producer` on ``backend``, its append calls made by
    ``append(n, pack, run_alone)``: ``n`` counts them, ``pack()`` packs the real append script
    call for the batch's round trip, ``run_alone()`` runs it in Redis at once, outside it."""
    calls = 0

    def counted(bound: BoundScript, keys: Any, args: Any) -> Any:
        nonlocal calls
        calls += 1
        return append(
            calls,
            lambda: _pack(bound, keys, args),
            lambda: bound.script(bound.keys, (*bound.fixed, *args)),
        )

    HOOKS[id(backend.owners.append_script)] = counted
    stream = Stream(producer, backend=backend)
    stream.start()
    return stream


def lost_replies(url: str) -> dict[str, Any]:
    """Every third append runs in Redis, then its reply is 'lost'."""
    backend = RedisBackend(url, lease=5)

    def lose_every_third_reply(n: int, pack: Callable[[], Any], now: Callable[[], Any]) -> Any:
        if n % 3 == 0:
            now()  # it runs in Redis...
            raise redis.ConnectionError("the reply was lost")  # ...and its reply is lost
        return pack()

    stream = started_with(backend, lose_every_third_reply)
    ended = stream.wait(10)
    client = redis.Redis.from_url(url)
    entries: Any = client.xrange(f"sse:{{{stream.id}}}:events")
    return {
        "ended": ended,
        "state": stream.state.value,
        "local_ids": [e.id for e in stream.buffered_after(0)],
        "redis_ids": [int(e[0].split(b"-")[0]) for e in entries],
        "redis_state": client.hget(f"sse:{{{stream.id}}}:meta", "state").decode(),  # type: ignore[union-attr]
        "text": "".join(
            e.data["text"] for e in stream.buffered_after(0) if e.event == "text_delta"
        ),
    }


def refused(url: str) -> dict[str, Any]:
    """Redis refuses every append after the start (not a fencing, not an end elsewhere)."""
    backend = RedisBackend(url, lease=1)

    def refuse_after_the_start(n: int, pack: Callable[[], Any], _: Callable[[], Any]) -> Any:
        if n > 1:
            raise redis.ResponseError("ERR something unexpected")
        return pack()

    stream = started_with(backend, refuse_after_the_start)
    ended = stream.wait(10)
    terminal = stream.terminal_event
    gevent.sleep(0.6)  # the renew loop looks every third of a lease
    return {
        "ended": ended,
        "terminal": terminal.data if terminal else None,
        "still_renewing": stream.id in backend.owners.streams,
    }


def outage() -> dict[str, Any]:
    """Counting clients while Redis breaks every connection: each claim lets its client through,
    and the pool keeps every connection it had."""

    def hang_up(sock: socket.socket, _address: Any) -> None:
        sock.recv(65536)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), hang_up)
    server.start()
    backend = RedisBackend(f"redis://127.0.0.1:{server.server_port}/0", lease=1)
    places = [backend.claim_client("192.0.2.1", 5) for _ in range(3)]
    pool: Any = backend.redis.connection_pool
    server.stop()
    return {"places": places, "free": pool.pool.qsize(), "size": pool.max_connections}


def busy(url: str) -> dict[str, Any]:
    """Counting clients while Redis is busy running another client's endless script: it answers
    BUSY, an error reply rather than a broken connection, to the accountant's pipeline. Each
    claim lets its client through, the pool has every connection back at
    once (not only when the failed pipeline is collected), and claims are counted again once the
    script is killed."""
    backend = RedisBackend(url, lease=1)
    pool: Any = backend.redis.connection_pool
    held = backend.claim_client("192.0.2.2", 5) or ""  # the accountant has work, and a connection
    with busy_redis(url):
        places = [backend.claim_client("192.0.2.2", 5) for _ in range(3)]
        free = pool.pool.qsize()
    after = backend.claim_client("192.0.2.2", 5)
    for token in (held, after):
        backend.release_client(token or "")
    return {"places": places, "free": free, "size": pool.max_connections, "after": after}


def pipeline_blip(url: str) -> dict[str, Any]:
    """The connection breaks once as a pipeline is sent (a transaction when a stream starts, a
    plain pipeline when asking which streams run). redis-py empties a pipeline when it runs it,
    sent or not: a retry used to run nothing, and the stream was then fenced out for want of
    its metadata, and ``active`` failed on a short reply."""
    broken: list[str] = []
    originals = {}
    for name in ("_execute_transaction", "_execute_pipeline"):
        original = originals[name] = getattr(redis.client.Pipeline, name)

        def once(self: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            if _name not in broken:
                broken.append(_name)
                raise redis.ConnectionError("the connection broke")
            return _original(self, *args)

        setattr(redis.client.Pipeline, name, once)
    try:
        backend = RedisBackend(url, lease=5)
        stream = Stream(producer, backend=backend)
        stream.start()
        ended = stream.wait(10)
        running = Stream(lambda ctx: ctx.sleep(10), backend=backend)
        running.start()
        active = backend.active([stream.id, running.id, "AAAAAAAAAAAAAAAAAAAAAA"])
        running.cancel()
    finally:
        for name, original in originals.items():
            setattr(redis.client.Pipeline, name, original)
    return {
        "broken": broken,
        "ended": ended,
        "state": stream.state.value,
        "ids": [e.id for e in stream.buffered_after(0)],
        "active": list(active.values()),
    }


if __name__ == "__main__":
    url = sys.argv[1]
    blip = pipeline_blip(url)  # first: no other backend's accountant may meet its breaks
    outcome = {"lost_replies": lost_replies(url), "refused": refused(url), "outage": outage()}
    print(json.dumps({**outcome, "busy": busy(url), "pipeline_blip": blip}))
