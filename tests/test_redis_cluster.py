"""Redis Cluster: a real 3-primary cluster (one replica each) on loopback, two gunicorn instances
of two gevent workers each, one PostgreSQL database.

Streams land on every shard and are read everywhere with the contract's exactness; events are
published only on the shard that owns their stream (``SPUBLISH``), each worker holding at most
one sharded subscriber connection per primary; a slot migrated mid-stream (``ASK``, ``TRYAGAIN``,
then ``MOVED``) and a primary killed mid-stream (its replica promoted) lose nothing and repeat
nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from tests.conftest import PostgresServer, read_stream
from tests.helpers.redis_topologies import (
    TEXT,
    LocalCluster,
    assert_exact,
    callers_wait_for_a_connection,
    cut_replication,
    demo,
    instances,
    mend_replication,
    readers,
)

pytestmark = pytest.mark.timeout(200)

LEASE = 6.0  # longer than a failover (node timeout 1 s, promotion within a few seconds)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas=1) as local:
        yield local


@pytest.fixture(scope="module")
def env(server_factory: Any, cluster: LocalCluster, postgres: PostgresServer) -> Iterator[Any]:
    with instances(server_factory, postgres, cluster.url, lease=LEASE) as both:
        yield both


def shard_stats(cluster: LocalCluster) -> dict[int, Counter[str]]:
    """Per live primary: calls of each command so far (``INFO commandstats``)."""
    out: dict[int, Counter[str]] = {}
    for port in cluster.procs:
        node = cluster.node(port)
        if node.info("replication")["role"] != "master":
            continue
        stats = node.info("commandstats")
        out[port] = Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})
    return out


def sharded_subscribers(cluster: LocalCluster) -> dict[int, Counter[str]]:
    """Per live primary: our workers' connections that hold sharded subscriptions, by name."""
    out: dict[int, Counter[str]] = {}
    for port in cluster.procs:
        clients = cluster.node(port).client_list()
        out[port] = Counter(
            c["name"] for c in clients
            if c["name"].startswith("sse-blueprint:") and int(c.get("ssub", 0)) > 0
        )  # fmt: skip
    return out


def test_streams_on_every_shard_are_read_everywhere(env: Any, cluster: LocalCluster) -> None:
    before = shard_stats(cluster)
    streams = [demo(base) for base in (env.a.url, env.b.url) for _ in range(4)]
    owners = {cluster.port_of("{" + sid + "}") for sid in streams}
    with ThreadPoolExecutor(16) as pool:
        following = readers(pool, env, streams * 2)
        time.sleep(1.0)
        subscribers = sharded_subscribers(cluster)  # while they read
        for reader in following:
            assert_exact(reader.result(timeout=150))
    after = shard_stats(cluster)
    # Events went out only on the shards that own their streams, never broadcast by PUBLISH.
    assert all(after[p]["publish"] == before.get(p, Counter())["publish"] for p in after)
    assert {p for p in after if after[p]["spublish"] > before.get(p, Counter())["spublish"]} == (
        owners
    )
    # At most one sharded subscriber connection per worker per primary.
    assert all(count == 1 for node in subscribers.values() for count in node.values())
    assert any(subscribers.values())


def test_active_and_clients_per_address_across_shards(env: Any, cluster: LocalCluster) -> None:
    running = demo(env.a.url, chunk=1, interval=40)
    finished = demo(env.b.url, text="short", interval=0)
    deadline = time.monotonic() + 20
    while httpx.get(f"{env.a.url}/api/streams/{finished}/status").json()["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ids = [running, finished, "AAAAAAAAAAAAAAAAAAAAAA"]
    for base in (env.a.url, env.b.url):
        answer = httpx.get(f"{base}/test/active", params=[("id", i) for i in ids]).json()
        assert answer == {running: True, finished: False, ids[2]: False}

    # Two loopback addresses whose sets live on different shards; 2 places each, everywhere.
    by_port: dict[int, str] = {}
    for n in range(1, 200):
        address = f"127.0.0.{n}"
        by_port.setdefault(cluster.port_of("{" + address + "}"), address)
        if len(by_port) >= 2:
            break
    addresses = list(by_port.values())[:2]
    assert key_slot(f"{{{addresses[0]}}}".encode()) != key_slot(f"{{{addresses[1]}}}".encode())
    limited = [env.instance({"SSE_MAX_CLIENTS_PER_ADDRESS": 2}) for _ in range(2)]
    held: list[httpx.Response] = []
    clients = {a: httpx.Client(transport=httpx.HTTPTransport(local_address=a)) for a in addresses}
    try:
        for address, client in clients.items():
            for server in limited:
                request = client.build_request("GET", f"{server.url}/api/streams/{running}")
                response = client.send(request, stream=True)
                assert response.status_code == 200, (address, response.status_code)
                held.append(response)
            for server in limited:
                refused = client.get(f"{server.url}/api/streams/{running}")
                assert refused.status_code == 429, address
    finally:
        for response in held:
            response.close()
        for client in clients.values():
            client.close()
        httpx.post(f"{env.a.url}/api/streams/{running}/cancel", json={})


def test_a_slot_migrated_mid_stream_loses_nothing(env: Any, cluster: LocalCluster) -> None:
    stream_id = demo(env.a.url, chunk=2, interval=15)  # about 6 s
    slot = key_slot(("{" + stream_id + "}").encode())
    source = cluster.port_of("{" + stream_id + "}")
    primaries = {cluster.port_of("{" + s + "}") for s in ("a", "b", "c", "d", "e", "f", "g")}
    target = next(p for p in sorted(primaries) if p != source)
    with ThreadPoolExecutor(4) as pool:
        following = readers(pool, env, [stream_id] * 4)
        time.sleep(1.0)
        moved = cluster.migrate_slot(slot, source, target)
        assert moved >= 3  # its meta, events and lease
        assert cluster.port_of("{" + stream_id + "}") == target
        for reader in following:
            assert_exact(reader.result(timeout=150))
    fresh = read_stream(env.b.url, stream_id)
    assert fresh.transcript.text() == TEXT


def test_a_primary_killed_mid_stream_loses_nothing(env: Any, cluster: LocalCluster) -> None:
    streams = [
        demo(base, chunk=2, interval=15) for base in (env.a.url, env.b.url) for _ in range(3)
    ]
    victim = cluster.port_of("{" + streams[0] + "}")
    with ThreadPoolExecutor(12) as pool:
        following = readers(pool, env, streams * 2)
        time.sleep(1.0)
        cluster.kill(victim)  # SIGKILL: its replica takes over its slots
        for reader in following:
            assert_exact(reader.result(timeout=150))
    cluster.wait_healthy()
    assert cluster.port_of("{" + streams[0] + "}") != victim
    for sid in streams:
        assert httpx.get(f"{env.b.url}/api/streams/{sid}/status").json()["state"] == "done"
    cluster.start_node(victim)  # it comes back as a replica of the promoted one
    cluster.wait_healthy()


def test_writes_a_failover_lost_are_written_again(env: Any, cluster: LocalCluster) -> None:
    """Replication is asynchronous: a primary acknowledges writes its replica has not got yet,
    and dies. The promoted replica answers the owner's next append with the gap; the owner
    writes what Redis lost again from its buffer, and readers see every event once."""
    stream_id = demo(env.a.url, chunk=2, interval=15)
    victim = cluster.port_of("{" + stream_id + "}")
    replica = cluster.replica_of(victim)
    log_size = env.a.log_path.stat().st_size
    with ThreadPoolExecutor(4) as pool:
        following = readers(pool, env, [stream_id] * 4)
        time.sleep(1.0)
        cut_replication(cluster.node(replica))  # the primary goes on acknowledging appends
        time.sleep(0.6)
        cluster.kill(victim)
        mend_replication(cluster.node(replica))  # it takes over without the last 0.6 s of appends
        for reader in following:
            assert_exact(reader.result(timeout=150))
    cluster.wait_healthy()
    assert cluster.port_of("{" + stream_id + "}") == replica
    with open(env.a.log_path, encoding="utf-8") as log:
        log.seek(log_size)
        assert "Redis lacks events" in log.read()  # the gap was there, and was filled
    assert read_stream(env.b.url, stream_id).transcript.text() == TEXT
    cluster.start_node(victim)
    cluster.wait_healthy()


def test_more_callers_than_connections_wait_for_one(cluster: LocalCluster) -> None:
    """A worker's pool per node is bounded (16): the 17th caller at once waits for a connection
    rather than failing with "Too many connections"."""
    callers_wait_for_a_connection(cluster.url, 40)
