"""Redis Sentinel: a primary, its replica and a Sentinel on loopback; two gunicorn instances of
two gevent workers each on ``redis+sentinel://``, one PostgreSQL database.

Streams are read everywhere with the contract's exactness, and a failover mid-stream (the
primary killed after acknowledging appends its replica never got, the replica promoted) loses
nothing and repeats nothing: the owners write again what Redis lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import PostgresServer, read_stream
from tests.helpers.redis_topologies import (
    TEXT,
    LocalSentinel,
    assert_exact,
    callers_wait_for_a_connection,
    cut_replication,
    demo,
    instances,
    mend_replication,
    readers,
)

pytestmark = pytest.mark.timeout(200)

LEASE = 8.0  # longer than a failover (down after 1 s, then an election and a promotion)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    with LocalSentinel() as local:
        yield local


@pytest.fixture(scope="module")
def env(server_factory: Any, sentinel: LocalSentinel, postgres: PostgresServer) -> Iterator[Any]:
    with instances(server_factory, postgres, sentinel.url, lease=LEASE) as both:
        yield both


def test_streams_are_read_everywhere_through_the_sentinel(env: Any) -> None:
    streams = [demo(base) for base in (env.a.url, env.b.url) for _ in range(2)]
    with ThreadPoolExecutor(8) as pool:
        for reader in readers(pool, env, streams * 2):
            assert_exact(reader.result(timeout=150))


def test_more_callers_than_connections_wait_for_one(sentinel: LocalSentinel) -> None:
    """A worker's pool is bounded (16): the 17th caller at once waits for a connection rather
    than failing with "Too many connections"."""
    callers_wait_for_a_connection(sentinel.url, 80)


def test_a_failover_mid_stream_loses_nothing(env: Any, sentinel: LocalSentinel) -> None:
    streams = [demo(base, chunk=2, interval=15) for base in (env.a.url, env.b.url)]
    sizes = [server.log_path.stat().st_size for server in (env.a, env.b)]
    with ThreadPoolExecutor(4) as pool:
        following = readers(pool, env, streams * 2)
        time.sleep(1.0)
        cut_replication(sentinel.node(sentinel.replica))  # acknowledged, never replicated
        time.sleep(0.6)
        sentinel.kill(sentinel.primary)
        mend_replication(sentinel.node(sentinel.replica))
        for reader in following:
            assert_exact(reader.result(timeout=150))
    sentinel.wait_primary(sentinel.replica)
    logs = ""
    for server, size in zip((env.a, env.b), sizes, strict=True):
        with open(server.log_path, encoding="utf-8") as log:
            log.seek(size)
            logs += log.read()
    assert "Redis lacks events" in logs  # the gap was there, and was filled
    for stream_id in streams:
        assert read_stream(env.b.url, stream_id).transcript.text() == TEXT
        status = httpx.get(f"{env.a.url}/api/streams/{stream_id}/status").json()
        assert status["state"] == "done"
