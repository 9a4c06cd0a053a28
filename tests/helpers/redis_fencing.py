"""Run as ``python -m tests.helpers.redis_fencing REDIS_URL``: a fenced producer's writes are
refused, and it is stopped where it pauses.

A separate process because the Redis backend expects gevent's monkey-patched sockets, as in a
gunicorn gevent worker; it prints what happened as JSON for the test to check.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, cast  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import redis  # noqa: E402

from sse_blueprint import ProducerContext, Stream, StreamClosed  # noqa: E402
from sse_blueprint.backends.redis import RedisBackend  # noqa: E402


def main(url: str) -> None:
    backend = RedisBackend(url, lease=5)
    refused: list[str] = []
    go = gevent.event.Event()

    def producer(ctx: ProducerContext) -> None:
        ctx.text(0, "mine")
        go.wait()
        try:
            ctx.text(0, " stale")  # (not waited for: it goes out when the producer pauses)
            ctx.sleep(5)  # where the refusal stops it
        except StreamClosed as exc:
            refused.append(repr(exc))
            raise

    stream = Stream(producer, backend=backend)
    stream.start()
    gevent.sleep(0.1)
    client = redis.Redis.from_url(url)
    meta, events = f"sse:{{{stream.id}}}:meta", f"sse:{{{stream.id}}}:events"
    client.hset(meta, "gen", "someone-else")  # a new owner's generation
    go.set()
    ended = stream.wait(5)
    greenlet = stream.producer.greenlet
    assert greenlet is not None
    greenlet.join(5)  # (the refusal stops it once the stream has ended)
    terminal = stream.terminal_event
    print(
        json.dumps(
            {
                "ended": ended,
                "refused": len(refused),
                "in_redis": [e[1][b"e"].decode() for e in cast(Any, client.xrange(events))],
                "terminal": terminal.data if terminal else None,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
