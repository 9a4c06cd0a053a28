"""Run as ``python -m tests.helpers.redis_gap REDIS_URL SQLITE_PATH``: a failover that lost
events the owner has since persisted and trimmed, played exactly, then a mirror made after it.

The owner writes, persists and trims (buffer of 4); Redis's state is saved; the owner writes on,
persists and trims past it; the saved state is put back (as a replica promoted with only that
would hold). The owner's next write is refused with the gap, and it writes again what it still
buffers: the events between are only in the store. Another worker (a second backend in this
process) then makes its mirror, and a reader resumes there from an id the promoted replica
still had. Prints, as JSON, the mirror's buffered ids when made, the resume id, the events the
reader got and the text the producer wrote; then whether a reader that subscribes to that
mirror after it was replaced is cut, and whether the next one gets a new, ended mirror.

A separate process because the Redis backend expects gevent's monkey-patched sockets.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, cast  # noqa: E402

import gevent.event  # noqa: E402
import redis  # noqa: E402

from sse_blueprint import ProducerContext, SQLStore, Stream  # noqa: E402
from sse_blueprint.backends.redis import RedisBackend  # noqa: E402
from sse_blueprint.backends.redis.scripts import stream_keys  # noqa: E402
from sse_blueprint.engine import Mirror  # noqa: E402

WRITES = (10, 10, 1, 10)  # text deltas before each wait (the one delta meets the gap)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        gevent.sleep(0.01)


def main(url: str, db: str) -> None:
    client = redis.Redis.from_url(url)
    store = SQLStore(f"sqlite:///{db}")
    go = [gevent.event.Event() for _ in WRITES]

    def producer(ctx: ProducerContext) -> None:
        with ctx.block("text") as block:
            for phase, writes in enumerate(WRITES):
                for n in range(writes):
                    block.write(f"{phase}.{n} ")
                    ctx.sleep(0.001)
                go[phase].wait()

    owner = RedisBackend(url, lease=60)
    stream = Stream(producer, backend=owner, store=store, buffer_size=4)
    meta, events, _, _ = stream_keys(stream.id)
    stream.start()
    until(lambda: stream.last_event_id >= 12 and stream.trimmed_id >= 5, "the first trim")
    saved = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(events))
    saved_last = int(cast(bytes, client.hget(meta, "last_id")))
    go[0].set()
    until(lambda: stream.last_event_id == saved_last + 10, "the second phase")
    persister = stream.persister
    assert persister is not None
    stream.buffer_size = 1000  # no write is due until the mirror is made; this one writes all
    persister.request()
    until(lambda: persister.persisted_id == stream.last_event_id, "a write of everything")
    until(lambda: stream.trimmed_id > saved_last + 1, "a trim past the saved state")
    gevent.sleep(0.2)  # (the owner's trim of Redis that follows it)

    with client.pipeline(transaction=True) as pipe:  # the promoted replica's state
        pipe.delete(events)
        for entry_id, fields in saved:
            pipe.xadd(events, cast(Any, fields), id=entry_id)
        pipe.hset(meta, "last_id", saved_last)
        pipe.execute()
    go[1].set()
    until(
        lambda: int(cast(bytes, client.hget(meta, "last_id"))) > stream.trimmed_id,
        "the gap written",
    )

    other = RedisBackend(url, lease=60, make_mirror=lambda sid: Mirror(sid, store=store))
    mirror = other.mirror(stream.id)
    assert mirror is not None
    made_with = [ev.id for ev in mirror.buffer.events]
    resume = int(saved[0][0].split(b"-")[0])  # an id Redis still had
    reader = mirror.subscribe(resume)
    go[2].set()
    go[3].set()
    got: list[dict[str, Any]] = []
    while not reader.done:
        got += [{"id": ev.id, "event": ev.event, "data": ev.data} for ev in reader.poll(5)]
    reader.close()
    # The mirror replaced (as when it misses what Redis trimmed), while a reader that found it
    # has not subscribed yet: that reader is cut at once, and the next one gets a new mirror.
    other._mirrors._restart(mirror)
    late = mirror.subscribe(resume)
    replaced = other.mirror(stream.id)
    text = "".join(f"{phase}.{n} " for phase, writes in enumerate(WRITES) for n in range(writes))
    print(
        json.dumps(
            {
                "mirror": made_with, "resume": resume, "events": got, "text": text,
                "late_cut": late.cut and late.done,
                "replaced": replaced is not None and replaced is not mirror,
                "replaced_ends": replaced is not None and replaced.finished,
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
