"""Run as ``python -m tests.helpers.redis_calls REDIS_URL``: how many script calls a producer's
events take in Redis, when it writes several events before each pause.

A separate process because the Redis backend expects gevent's monkey-patched sockets, as in a
gunicorn gevent worker; it prints what Redis counted (``INFO commandstats``) and what it holds
as JSON for the test to check.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, cast  # noqa: E402

import redis  # noqa: E402

from sse_blueprint import ProducerContext, Stream  # noqa: E402
from sse_blueprint.backends.redis import RedisBackend  # noqa: E402

PAUSES = 20


def producer(ctx: ProducerContext) -> None:
    """Five events before each pause: a block, its text, its end, an app event, a progress."""
    for p in range(PAUSES):
        with ctx.block("text", {"p": p}) as block:
            block.write(f"[{p}]")
        ctx.send("note", {"p": p})
        ctx.send("progress", {"p": p}, replay="latest")
        ctx.sleep(0.005)


def calls(client: redis.Redis) -> dict[str, int]:
    """Commands Redis has run so far, less those that failed (a script's first call, before
    it is loaded, fails with NOSCRIPT and is sent again)."""
    stats: dict[str, Any] = cast(Any, client.info("commandstats"))
    counted = {}
    for name in ("evalsha", "xadd"):
        stat = stats.get(f"cmdstat_{name}", {})
        counted[name] = int(stat.get("calls", 0)) - int(stat.get("failed_calls", 0))
    return counted


def main(url: str) -> None:
    client = redis.Redis.from_url(url)
    backend = RedisBackend(url, lease=60)  # (no lease renewal while it runs: only appends)
    before = calls(client)
    stream = Stream(producer, backend=backend)
    stream.start()
    assert stream.wait(30)
    after = calls(client)
    entries = cast(Any, client.xrange(f"sse:{{{stream.id}}}:events"))
    print(
        json.dumps(
            {
                "pauses": PAUSES,
                "script_calls": after["evalsha"] - before["evalsha"],
                "xadds": after["xadd"] - before["xadd"],
                "ids": [int(e[0].split(b"-")[0]) for e in entries],
                "events": [e[1][b"e"].decode() for e in entries],
                "buffer": [ev.id for ev in stream.buffer.events],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
