"""Leak-proofing: 2,000 connect/disconnect cycles of every kind leave the worker at baseline.

One gevent worker with Redis and PostgreSQL. Kinds of cycle: hang up mid-stream (SSE and
NDJSON), read a finished stream from a random id (buffer and database catch-ups), refusals
(204, 404, 400), streams that end done, cancelled, failed and timed out, and frozen clients cut
for lagging. Afterwards the worker's descriptors, live greenlets, readers, database pool
checkouts and Redis connections are back where they were.
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis

from tests.conftest import (
    LIVE_APP,
    LiveServer,
    PostgresServer,
    RedisServer,
    read_stream,
    start_stream,
)

CYCLES = 2000


def _get(port: int, path: str, headers: str = "", *, first_bytes: int = 0) -> bytes:
    """GET over a raw socket; read ``first_bytes`` (then hang up) or everything."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
        sock.sendall(request.encode())
        got = b""
        while True:
            chunk = sock.recv(65536)
            got += chunk
            if not chunk or (first_bytes and len(got) >= first_bytes):
                return got


def _frozen(port: int, path: str) -> None:
    """A client that stops reading with a tiny receive buffer: the server must cut it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(1.5)  # the flood outruns it; it is cut
    sock.close()


def _resources(base: str) -> dict[str, int]:
    found: dict[str, int] = httpx.get(f"{base}/test/resources", timeout=20).json()
    return found


def _settled(base: str, baseline: dict[str, int], timeout: float = 30) -> dict[str, int]:
    """The worker's resources once they are back to ``baseline`` (or ``timeout`` has passed).

    Finished streams keep a few greenlets for a while (a retention timer, a lease renewal that
    wakes a third of a lease later), so right after the last cycle the count depends on how
    fast the machine ran it; a leak is what is still there once they have all fired."""
    deadline = time.monotonic() + timeout
    while True:
        now = _resources(base)
        quiet = now["readers"] == 0 and now["running"] == 0 and now["db_checked_out"] == 0
        back = now["fds"] <= baseline["fds"] + 2 and now["greenlets"] <= baseline["greenlets"] + 2
        if (quiet and back) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def test_two_thousand_cycles_leave_no_trace(
    server_factory: Any, postgres: PostgresServer, redis_server: RedisServer
) -> None:
    name = "lk_" + uuid.uuid4().hex[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    server: LiveServer = server_factory(
        {
            "SSE_DATABASE_URL": postgres.url.rsplit("/", 1)[0] + f"/{name}",
            "SSE_REDIS_URL": redis_server.url,
            "SSE_HEARTBEAT_INTERVAL": 0.2,
            "SSE_CLIENT_QUEUE": 64,
            "SSE_RETENTION": 1,
            "SSE_BUFFER_SIZE": 16,
        },
        app=LIVE_APP,
    )
    port = int(server.url.rsplit(":", 1)[1])
    rng = random.Random(2000)
    redis_client = redis.Redis.from_url(redis_server.url)
    long_text = "".join(f"Block {i}: " + "words " * 30 + "\n\n" for i in range(40))

    def long_stream() -> str:
        return start_stream(server.url, "demo", text=long_text, chunk_size=3, interval_ms=20)

    finished = start_stream(server.url, "demo", text=long_text, chunk_size=50, interval_ms=0)
    read_stream(server.url, finished)
    last = read_stream(server.url, finished).events[-1].id

    def one_of_each(i: int, live: str) -> int:
        """One cycle of kind ``i % 10``; returns how many connections it made."""
        kind = i % 10
        if kind in (0, 1, 2):  # hang up mid-stream
            _get(port, f"/api/streams/{live}", first_bytes=rng.randint(1, 400))
        elif kind == 3:
            _get(port, f"/api/streams/{live}?format=ndjson", first_bytes=rng.randint(1, 400))
        elif kind in (4, 5):  # a finished stream from a random id (buffer or database)
            _get(port, f"/api/streams/{finished}", f"Last-Event-ID: {rng.randint(0, last)}\r\n")
        elif kind == 6:  # refusals
            path = rng.choice(
                [f"/api/streams/{finished}?last_event_id={last}", "/api/streams/" + "z" * 22,
                 f"/api/streams/{finished}?last_event_id=-5", "/api/streams/../../etc"]
            )  # fmt: skip
            _get(port, path)
        elif kind == 7:  # a stream cancelled while read
            sid = long_stream()
            reader = readers.submit(_get, port, f"/api/streams/{sid}")
            time.sleep(0.05)
            # (This once found a race: a cancel numbered its event while the producer's append
            # was in flight to Redis, got the same id, and was refused.)
            assert httpx.post(f"{server.url}/api/streams/{sid}/cancel", json={}).status_code == 202
            assert b"event: cancelled" in reader.result(timeout=20)
            return 2
        elif kind == 8:  # one that fails, one that times out
            for producer in ("fail", "stall"):
                sid = start_stream(server.url, producer)
                assert b"event: error" in _get(port, f"/api/streams/{sid}")
            return 2
        else:  # one read to its end
            sid = start_stream(server.url, "demo", text="short\n\nreply", chunk_size=2)
            assert b"event: done" in _get(port, f"/api/streams/{sid}")
        return 1

    def cycles(count: int) -> int:
        made, i = 0, 0
        while made < count:
            live = long_stream()
            batch = [pool.submit(one_of_each, i + k, live) for k in range(10)]
            made += sum(f.result(timeout=60) for f in batch)
            i += 10
            if i % 200 == 0:  # now and then a frozen client on a flood, cut for lagging
                flood = start_stream(server.url, "flood", count=400, size=2000)
                _frozen(port, f"/api/streams/{flood}")
                made += 1
            httpx.post(f"{server.url}/api/streams/{live}/cancel", json={})
        return made

    def outside_pools(found: dict[str, int]) -> int:
        """Descriptors that are not pooled connections (pools grow to their working size)."""
        return found["fds"] - found["db_open"] - found["redis_connections"]

    with ThreadPoolExecutor(10) as pool, ThreadPoolExecutor(10) as readers:
        cycles(200)  # warm up: pools and lazily started greenlets reach their working size
        baseline = _settled(server.url, {"fds": 10**6, "greenlets": 10**6})
        redis_baseline = redis_client.info("clients")["connected_clients"]
        made = cycles(CYCLES)

    after = _settled(server.url, baseline)
    redis_after = redis_client.info("clients")["connected_clients"]
    print(f"cycles={made} baseline={baseline} after={after} redis={redis_baseline}->{redis_after}")
    assert made >= CYCLES
    assert after["readers"] == 0
    assert after["running"] == 0
    assert after["clients_by_address"] == 0
    assert after["db_checked_out"] == 0
    assert outside_pools(after) <= outside_pools(baseline)
    assert after["greenlets"] <= baseline["greenlets"] + 2
    assert after["redis_connections"] <= 16  # the pool's bound
    # Redis sees no connection besides the pool's (and the one Pub/Sub connection).
    pool_growth = after["redis_connections"] - baseline["redis_connections"]
    assert redis_after - redis_baseline <= pool_growth
