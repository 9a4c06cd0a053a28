"""The Redis backend: streams shared by several gunicorn instances of 3 gevent workers each.

Real redis-server (append-only file, fsync always), real PostgreSQL, real gunicorn. Connections
land on random workers of either instance, so most reads go through another worker's mirror.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sse_blueprint.client import CircuitBreaker, StreamClient
from tests.conftest import (
    DEMO_TEXT,
    LIVE_APP,
    ROOT,
    LiveServer,
    PostgresServer,
    RedisServer,
    cancel_reaches_every_reader,
    read_stream,
    start_stream,
    wait_done,
)
from tests.helpers.redis_busy import busy_redis
from tests.helpers.sse_parser import Transcript

LEASE = 2.0
SHORT = "A short reply: it ends within the grace period of the instance that leaves."
PARAGRAPHS = "".join(f"Part {i}: " + "streams and blocks " * 4 + "\n\n" for i in range(6)) + "End."


def shared_config(redis_server: RedisServer, postgres: PostgresServer) -> dict[str, Any]:
    """Config for instances that share ``redis_server`` and a new database of ``postgres``."""
    name = "r_" + uuid.uuid4().hex[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    return {
        "SSE_REDIS_URL": redis_server.url,
        "SSE_DATABASE_URL": postgres.url.rsplit("/", 1)[0] + f"/{name}",
        "SSE_REDIS_LEASE": LEASE,
        "SSE_HEARTBEAT_INTERVAL": 1,
    }


@pytest.fixture(scope="module")
def shared(
    server_factory: Any, redis_server: RedisServer, postgres: PostgresServer
) -> Iterator[Any]:
    """Two instances of 3 workers on one Redis and one database; tests may start more. All
    are stopped when this module is done (their logs are checked at the end of the session),
    so that their database pools do not crowd later modules out of PostgreSQL."""
    config = {**shared_config(redis_server, postgres), "SSE_RETRY_MS": 200}

    started: list[LiveServer] = []

    def instance_with(extra: dict[str, Any], workers: int = 3) -> LiveServer:
        server: LiveServer = server_factory({**config, **extra}, app=LIVE_APP, workers=workers)
        started.append(server)
        return server

    def instance() -> LiveServer:
        return instance_with({})

    yield types.SimpleNamespace(
        a=instance(), b=instance(), instance=instance, instance_with=instance_with,
        redis=redis_server,
    )  # fmt: skip
    for server in started:
        server.stop()


def kill_workers(server: LiveServer) -> tuple[int, float]:
    """SIGKILL every worker of ``server`` (its arbiter stays): how many, and when."""
    assert server.proc is not None
    workers = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    killed_at = time.monotonic()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    return len(workers), killed_at


def demo(base: str, text: str = DEMO_TEXT, chunk: int = 5, interval: int = 10) -> str:
    return start_stream(base, "demo", text=text, chunk_size=chunk, interval_ms=interval)


def test_streams_started_on_one_instance_are_read_everywhere(shared: Any) -> None:
    stream_ids = [demo(shared.a.url) for _ in range(3)]
    jobs = [(sid, base) for sid in stream_ids for base in [shared.b.url] * 4 + [shared.a.url] * 2]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: read_stream(job[1], job[0]), jobs))
    for result in results:
        assert result.transcript.text() == DEMO_TEXT
        assert result.transcript.terminal == "done"
        ids = result.transcript.ids
        assert ids == sorted(set(ids)), [(e.id, e.type, e.data) for e in result.events][-4:]
    for sid in stream_ids:
        for base in (shared.a.url, shared.b.url):
            status = httpx.get(f"{base}/api/streams/{sid}/status").json()
            assert status["state"] == "done"
            assert status["producer"] == "demo"


def test_resume_alternating_instances_is_exact(shared: Any) -> None:
    stream_id = demo(shared.b.url, chunk=2, interval=8)

    def reader(seed: int) -> tuple[Transcript, int]:
        rng = random.Random(seed)
        client = Transcript()
        hops = 0
        while client.terminal is None:
            base = (shared.a.url, shared.b.url)[hops % 2]
            result = read_stream(
                base, stream_id, client.last_id or None, stop_after=rng.randint(1, 9)
            )
            for event in result.events:
                client.apply(event.id, event.type, event.json())
            hops += 1
        return client, hops

    with ThreadPoolExecutor(4) as pool:
        readers = list(pool.map(reader, range(4)))
    for client, _ in readers:
        assert client.text() == DEMO_TEXT
        assert len(client.delta_ids) == len(set(client.delta_ids))
    # (How often each reader hopped depends on when the stream ended: a finished stream comes
    # from the store in a few events. Some reader read it live, over several hops.)
    assert max(hops for _, hops in readers) > 2


def test_late_joiner_elsewhere_catches_up_from_database_and_redis(shared: Any) -> None:
    stream_id = demo(shared.a.url, PARAGRAPHS, chunk=4, interval=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until some blocks are persisted and trimmed from Redis
        first = shared.redis_client.xrange(f"sse:{{{stream_id}}}:events", count=1)
        if first and int(first[0][0].split(b"-")[0]) > 30:
            break
        time.sleep(0.05)
    status = httpx.get(f"{shared.b.url}/api/streams/{stream_id}/status").json()
    assert status["state"] == "running"  # the late joiner comes while it still streams
    late = read_stream(shared.b.url, stream_id, 1)
    kinds = [e.type for e in late.events]
    assert kinds[0] == "turnblock_catchup"
    assert "text_delta" in kinds
    assert late.transcript.text() == PARAGRAPHS
    fresh = read_stream(shared.b.url, stream_id)
    assert fresh.events[0].type == "start"
    assert fresh.transcript.text() == PARAGRAPHS


@pytest.fixture(scope="module", autouse=True)
def redis_client(shared: Any) -> Any:
    shared.redis_client = redis.Redis.from_url(shared.redis.url)
    return shared.redis_client


def test_cancel_from_another_instance(shared: Any) -> None:
    stream_id = demo(shared.a.url, chunk=1, interval=40)
    bases = [shared.a.url, shared.a.url, shared.b.url, shared.b.url]
    for result in cancel_reaches_every_reader(shared.b.url, stream_id, bases, after=0.8):
        assert DEMO_TEXT.startswith(result.transcript.text())
    assert (
        httpx.get(f"{shared.a.url}/api/streams/{stream_id}/status").json()["state"] == "cancelled"
    )
    again = httpx.post(f"{shared.a.url}/api/streams/{stream_id}/cancel", json={})
    assert again.status_code == 200
    # The producer on the owner stopped: nothing follows the terminal event in Redis.
    time.sleep(0.3)
    last = shared.redis_client.xrevrange(f"sse:{{{stream_id}}}:events", count=1)[0]
    assert last[1][b"e"] == b"cancelled"


def test_active_streams_across_instances(shared: Any) -> None:
    running = demo(shared.a.url, chunk=1, interval=30)
    finished = demo(shared.a.url, interval=0)
    wait_done(shared.a.url, finished)
    unknown = "AAAAAAAAAAAAAAAAAAAAAA"
    params: list[tuple[str, str | int | float | bool | None]] = [
        ("id", running),
        ("id", finished),
        ("id", unknown),
    ]
    answer = httpx.get(f"{shared.b.url}/test/active", params=params).json()
    assert answer == {running: True, finished: False, unknown: False}
    httpx.post(f"{shared.b.url}/api/streams/{running}/cancel", json={})


def test_killing_the_owner_ends_its_streams_elsewhere_but_others_go_on(shared: Any) -> None:
    doomed_instance = shared.instance()
    doomed = demo(doomed_instance.url, chunk=1, interval=50)
    survivor = demo(shared.b.url, chunk=1, interval=10)
    with ThreadPoolExecutor(4) as pool:
        doomed_readers = [
            pool.submit(read_stream, shared.b.url, doomed, timeout=60) for _ in range(2)
        ]
        survivor_readers = [
            pool.submit(read_stream, shared.a.url, survivor, timeout=60) for _ in range(2)
        ]
        time.sleep(1)
        killed, killed_at = kill_workers(doomed_instance)
        assert killed == 3
        for reader in doomed_readers:
            result = reader.result(timeout=30)
            ended_after = time.monotonic() - killed_at
            assert result.events[-1].type == "error"
            assert result.events[-1].json()["message"] == "producer lost"
            assert ended_after < 2 * LEASE + 2  # within the lease (plus the watchdog's beat)
            assert DEMO_TEXT.startswith(result.transcript.text())
        for reader in survivor_readers:
            result = reader.result(timeout=30)
            assert result.transcript.text() == DEMO_TEXT
            assert result.events[-1].type == "done"
    status = httpx.get(f"{shared.a.url}/api/streams/{doomed}/status").json()
    assert status["state"] == "error"


def test_restarting_redis_mid_stream_loses_no_acknowledged_event(shared: Any) -> None:
    stream_id = demo(shared.a.url, PARAGRAPHS, chunk=3, interval=10)
    client = StreamClient(
        shared.b.url,
        breaker=CircuitBreaker(threshold=1000),
        sleep=lambda s: time.sleep(min(s, 0.2)),
    )
    seen: list[int] = []
    try:
        reader = client.open(stream_id)
        for event in reader:
            seen.append(event.id)
            if len(seen) == 25:
                shared.redis.restart(down_for=0.5)
    finally:
        client.close()
    assert reader.text() == PARAGRAPHS
    assert reader.state == "done"
    assert seen == sorted(set(seen))
    entries = shared.redis_client.xrange(f"sse:{{{stream_id}}}:events")
    assert int(entries[-1][0].split(b"-")[0]) == seen[-1]  # the terminal event survived too


def test_redis_away_past_the_owners_patience_loses_nothing_it_was_sent(shared: Any) -> None:
    """Redis stops mid-stream for longer than the owner may wait (5 s): the call that was out
    gets no answer (Redis may or may not have run it), so its events go again with the next
    call, the stream's end, once Redis is back. Every reader, on either instance, then rebuilds
    the same turn, each id once: the whole text if the producer had finished, else a prefix
    and an error."""
    stream_id = demo(shared.a.url, PARAGRAPHS, chunk=3, interval=20)
    time.sleep(0.5)
    shared.redis.restart(down_for=7)
    status = wait_done(shared.a.url, stream_id, timeout=40)
    assert status["state"] in ("done", "error")
    answers = [read_stream(base, stream_id) for base in (shared.a.url, shared.b.url) * 2]
    texts = {answer.transcript.text() for answer in answers}
    assert len(texts) == 1  # the same turn everywhere
    text = texts.pop()
    assert text == PARAGRAPHS if status["state"] == "done" else PARAGRAPHS.startswith(text)
    for answer in answers:
        assert answer.transcript.terminal == status["state"]
        ids = answer.transcript.ids
        assert ids == sorted(set(ids))
    assert f"stream {stream_id}: writing its end failed" in shared.a.log()  # (no answer)


def test_a_mirror_that_missed_what_redis_trimmed_is_replaced(shared: Any) -> None:
    """A worker's Pub/Sub connection is away while the owner persists and trims: when it is
    back, its mirror cannot be filled from Redis. It is replaced, its readers resuming from
    their last ids through the store: nothing missing, nothing twice."""
    text = PARAGRAPHS * 3
    port = shared.redis.port
    shared.redis_client.execute_command(
        "ACL", "SETUSER", "mirror", "on", ">pw", "~*", "&*", "+@all"
    )
    reading = shared.instance_with({"SSE_REDIS_URL": f"redis://mirror:pw@127.0.0.1:{port}/0"}, 1)
    log_size = reading.log_path.stat().st_size
    stream_id = demo(shared.a.url, text, chunk=3, interval=10)

    def away() -> None:  # new connections of the reading worker are refused for 2.5 s
        shared.redis_client.execute_command("ACL", "SETUSER", "mirror", "off")
        shared.redis_client.execute_command("CLIENT", "KILL", "USER", "mirror", "TYPE", "pubsub")
        time.sleep(2.5)
        shared.redis_client.execute_command("ACL", "SETUSER", "mirror", "on")

    client = StreamClient(
        reading.url, breaker=CircuitBreaker(threshold=1000), sleep=lambda s: time.sleep(min(s, 0.2))
    )
    seen: list[int] = []
    window = threading.Thread(target=away)
    try:
        reader = client.open(stream_id)
        for event in reader:
            seen.append(event.id)
            if len(seen) == 20:
                window.start()
    finally:
        client.close()
        window.join()
    assert reader.state == "done"
    assert reader.text() == text
    assert seen == sorted(set(seen))
    with open(reading.log_path, encoding="utf-8") as log:
        log.seek(log_size)
        assert "mirror missed events Redis no longer has" in log.read()


def test_a_mirror_made_after_a_failover_lost_persisted_events_is_exact(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A promoted replica lacks events that the owner has since persisted and dropped from its
    buffer: the owner writes again what it still buffers, and Redis must not hold the hole
    between. A mirror made afterwards holds no hole, and a reader resuming there from an id
    the replica still had gets the rest of the turn exactly (the store fills what Redis lost).
    Once that mirror is replaced, a reader that found it and subscribes only then is cut (it
    resumes on the new one) instead of following a mirror that nothing feeds."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.redis_gap", redis_server.url,
         str(tmp_path / "gap.sqlite3")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Redis lacks events" in result.stderr  # the gap was there
    outcome = json.loads(result.stdout)
    mirrored = outcome["mirror"]
    assert mirrored == list(range(mirrored[0], mirrored[0] + len(mirrored)))
    events = outcome["events"]
    ids = [ev["id"] for ev in events]
    assert ids == sorted(set(ids))
    assert ids[0] > outcome["resume"]
    assert events[-1]["event"] == "done"
    text = ""
    for ev in events:
        if ev["event"] == "turnblock_catchup":
            text = ev["data"]["content"]
        elif ev["event"] == "text_delta":
            text += ev["data"]["text"]
    assert text == outcome["text"]
    assert outcome["late_cut"]  # a reader of the mirror it replaced resumes
    assert outcome["replaced"]
    assert outcome["replaced_ends"]


def test_a_busy_redis_delays_streams_and_loses_nothing(shared: Any) -> None:
    """Another client's script keeps Redis busy for a second: it answers BUSY to every command,
    including the workers' SUBSCRIBEs. Appends and a stream created meanwhile wait and go on;
    readers on both instances get the exact text (a BUSY used to end the producer and kill the
    worker's Pub/Sub reader, whose readers then heard nothing)."""
    text = "busy " * 80
    stream_id = demo(shared.a.url, text, chunk=2, interval=15)  # about 3 s
    with ThreadPoolExecutor(8) as pool:
        bases = [shared.a.url, shared.b.url] * 3
        readers = [pool.submit(read_stream, base, stream_id, timeout=60) for base in bases]
        time.sleep(0.8)
        with busy_redis(shared.redis.url):
            created = pool.submit(demo, shared.b.url, DEMO_TEXT)  # a create while Redis is busy
            time.sleep(1.0)
            assert not created.done()  # it waited for Redis...
        other = created.result(timeout=30)  # ...and was created
        results = [r.result(timeout=60) for r in readers]
    for result in results:
        assert result.transcript.text() == text
        assert result.events[-1].type == "done"
        assert [e.id for e in result.events] == list(range(1, len(result.events) + 1))
    assert read_stream(shared.a.url, other).transcript.text() == DEMO_TEXT


def test_metadata_is_shared_across_instances(shared: Any) -> None:
    stream_id = start_stream(shared.a.url, "flood", count=40, size=10, interval_ms=20)
    time.sleep(0.3)
    running = httpx.get(f"{shared.b.url}/api/streams/{stream_id}/status").json()
    assert running["state"] == "running"
    assert running["metadata"] == {"count": 40, "size": 10}
    wait_done(shared.b.url, stream_id)
    done = httpx.get(f"{shared.b.url}/api/streams/{stream_id}/status").json()
    assert done["metadata"] == {"count": 40, "size": 10}


def test_a_redis_outage_is_a_clear_error_not_a_hang(shared: Any) -> None:
    shared.redis.stop()
    try:
        started = time.monotonic()
        response = httpx.post(
            f"{shared.a.url}/api/streams",
            json={"producer": "demo", "input": {"text": "x"}},
            timeout=30,
        )
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert "unavailable" in response.json()["error"]
        assert time.monotonic() - started < 15
        status = httpx.get(f"{shared.b.url}/api/streams/AAAAAAAAAAAAAAAAAAAAAA/status", timeout=30)
        assert status.status_code == 503
    finally:
        shared.redis.start()
    time.sleep(1)
    stream_id = demo(shared.a.url, interval=0)  # and streams work again once Redis is back
    assert read_stream(shared.b.url, stream_id).transcript.text() == DEMO_TEXT


def test_a_fenced_producer_cannot_write(redis_server: RedisServer) -> None:
    """Another producer took the stream over: the old one's writes are refused, atomically."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.redis_fencing", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    outcome = json.loads(result.stdout)
    assert outcome["ended"]
    assert outcome["refused"] == 1
    assert outcome["in_redis"] == ["start", "text_delta"]  # nothing after the takeover
    assert outcome["terminal"]["message"] == "producer fenced out"


def command_calls(client: redis.Redis) -> Counter[str]:
    """How many times Redis has run each command so far (scripts' own commands included)."""
    stats = client.info("commandstats").items()
    return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats})


def split_traffic(delta: Counter[str]) -> tuple[int, int, int, int]:
    """Commands for streams, and the claims, releases and renewed places of the count of
    clients per address. A claim is one EVALSHA running TIME, ZREMRANGEBYSCORE, ZCARD, ZADD and
    EXPIRE; a release one ZREM; a renewal one EVALSHA running TIME, then one ZADD per place,
    then EXPIRE. Nothing else runs ZCARD, ZREM or TIME."""
    claims, releases = delta["zcard"], delta["zrem"]
    renewals = delta["time"] - claims  # one per address per worker per lease
    renewed = delta["zadd"] - claims  # every claim here is granted
    accounting = 6 * claims + releases + 3 * renewals + renewed
    return delta.total() - accounting, claims, releases, renewed


def worker_connections(client: redis.Redis) -> Counter[str]:
    """Redis connections open now, by the worker that holds them (named for it)."""
    names = (c["name"] for c in client.client_list())
    return Counter(n for n in names if n.startswith("sse-blueprint:"))


def test_redis_traffic_per_event_does_not_grow_with_clients(shared: Any) -> None:
    report = []
    for clients in (10, 200):
        before = command_calls(shared.redis_client)
        stream_id = demo(shared.a.url, "x" * 300, chunk=2, interval=15)
        peak = 0
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            bases = [(shared.a.url, shared.b.url)[i % 2] for i in range(clients)]
            futures = [pool.submit(read_stream, base, stream_id, timeout=120) for base in bases]
            while not all(f.done() for f in futures):
                peak = max(peak, max(worker_connections(shared.redis_client).values(), default=0))
                time.sleep(0.1)
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - started
        assert all(r.transcript.text() == "x" * 300 for r in results)
        deadline = time.monotonic() + 10  # the responses' places are given back after they end
        while time.monotonic() < deadline:
            delta = command_calls(shared.redis_client) - before
            if delta["zrem"] >= clients:
                break
            time.sleep(0.1)
        calls, claims, releases, renewed = split_traffic(delta)
        events = results[0].events[-1].id
        report.append((clients, events, calls / events, peak, claims, releases, renewed, elapsed))
    line = ", ".join(
        f"{c} clients: {e} events, {per:.2f} commands/event, at most {p} connections a worker; "
        f"to count clients per address {cl} claims, {rel} releases and {ren} renewals in {t:.1f} s"
        for c, e, per, p, cl, rel, ren, t in report
    )
    print(f"\nREDIS TRAFFIC: {line}", file=sys.stderr)
    (small, large) = report
    assert large[2] < small[2] * 1.5 + 1  # commands per event do not scale with clients
    # Nor do connections: a worker has its Pub/Sub reader, its accountant, the lease renewals
    # and a few for catch-ups and appends, whatever its number of clients (33 a worker here). Its
    # pool keeps what earlier tests opened (10 after the whole module), and never exceeds 16.
    assert large[3] <= min(small[3] + 3, 16)
    for clients, _, _, _, claims, releases, renewed, elapsed in report:
        assert claims == releases == clients  # one claim and one release per response
        assert renewed <= clients * (elapsed / LEASE + 1)  # and a renewal per lease while open


def test_several_workers_without_redis_refuse_to_start(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_SSE_REDIS")}
    env["FLASK_SSE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--workers", "3",
         "--bind", "127.0.0.1:0", "app:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "FLASK_SSE_REDIS_URL" in result.stderr


def test_sigterm_hands_readers_over_to_another_instance(shared: Any) -> None:
    """Readers are released at once and resume elsewhere; producers get the grace period."""
    leaving: LiveServer = shared.instance_with({"SSE_SHUTDOWN_TIMEOUT": 2}, workers=1)
    short = demo(leaving.url, SHORT, chunk=2, interval=50)  # 1.5 s: it finishes in the grace
    long = demo(leaving.url, PARAGRAPHS, chunk=2, interval=50)  # about 12 s: it is stopped
    with ThreadPoolExecutor(4) as pool:
        firsts = {sid: pool.submit(read_stream, leaving.url, sid) for sid in (short, long)}
        time.sleep(1)
        assert leaving.proc is not None
        sent = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        released = {sid: f.result(timeout=20) for sid, f in firsts.items()}
        released_after = time.monotonic() - sent
        assert released_after < 1.5  # long before the producers' grace is over
        for result in released.values():
            assert result.events[-1].type not in ("done", "error", "cancelled")
        # EventSource reconnects with its last id, now to the instance that stays.
        rests = {
            sid: pool.submit(read_stream, shared.b.url, sid, result.events[-1].id)
            for sid, result in released.items()
        }
        ends = {sid: f.result(timeout=30) for sid, f in rests.items()}
        leaving.proc.wait(timeout=30)
        leaving.stop()
    for sid, text in ((short, SHORT), (long, PARAGRAPHS)):
        combined = Transcript()
        for event in released[sid].events + ends[sid].events:
            combined.apply(event.id, event.type, event.json())
        whole = read_stream(shared.b.url, sid).transcript
        assert combined.text() == whole.text()
        if sid == short:
            assert combined.terminal == "done"
            assert combined.text() == text
        else:
            assert combined.terminal == "error"
            assert ends[sid].events[-1].json()["message"] == "server shutting down"
            assert text.startswith(combined.text())


def _scrape(base: str) -> dict[str, float]:
    """The metrics endpoint as {"name{labels}": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base}/api/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def test_metrics_move_and_add_up_across_workers(shared: Any) -> None:
    """Two workers: whichever serves the endpoint, it shows both workers' sums."""
    server: LiveServer = shared.instance_with({"SSE_METRICS": True}, workers=2)
    before = _scrape(server.url)
    stream_id = demo(server.url, PARAGRAPHS, chunk=20, interval=150)  # about 4 s
    with ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(read_stream, server.url, stream_id) for _ in range(4)]
        during = _scrape(server.url)
        while during["sse_clients_connected{}"] < 4 and not all(r.done() for r in readers):
            time.sleep(0.1)  # (on a loaded machine the readers take a while to connect)
            during = _scrape(server.url)
        results = [r.result(timeout=30) for r in readers]
    events = len(results[0].events)
    wait_done(server.url, stream_id)
    # Once the blocks are persisted and the buffers trimmed (on a loaded machine that can take
    # more than a second), a resume from id 1 is caught up from the database.
    deadline = time.monotonic() + 15
    while True:
        resumed = read_stream(server.url, stream_id, 1)
        if resumed.events[0].type == "turnblock_catchup" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resumed.events[0].type == "turnblock_catchup"
    time.sleep(0.5)
    scrapes = [_scrape(server.url) for _ in range(8)]  # lands on both workers
    after = scrapes[0]

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert during["sse_clients_connected{}"] >= 4
    assert after["sse_clients_connected{}"] == 0
    assert moved("sse_streams_started_total{producer=demo}") == 1
    assert moved("sse_streams_finished_total{producer=demo,state=done}") == 1
    assert moved("sse_events_total{}") == events
    assert moved("sse_events_sent_total{}") >= 4 * events + len(resumed.events)
    assert moved("sse_bytes_sent_total{}") >= sum(len(r.raw) for r in results)
    assert moved("sse_catchups_total{source=buffer}") >= 4
    assert moved("sse_catchups_total{source=database}") >= 1
    assert moved("sse_persist_seconds_count{}") >= 1
    assert after["sse_streams_active{}"] == 0
    assert all(s == after for s in scrapes), "the workers disagree about the totals"


def test_metrics_are_off_unless_configured(shared: Any) -> None:
    response = httpx.get(f"{shared.a.url}/api/metrics")
    assert response.status_code == 404
    assert "SSE_METRICS" in response.json()["error"]


def test_clients_per_address_are_limited_across_instances(shared: Any) -> None:
    """3 open responses per address on two instances of 3 workers each (about one per worker:
    each worker alone is far below the limit); a killed worker's places come back by themselves."""
    limits = {"SSE_MAX_CLIENTS_PER_ADDRESS": 3, "SSE_HEARTBEAT_INTERVAL": 0.3}
    first, second = shared.instance_with(limits), shared.instance_with(limits)
    stream_id = demo(first.url, PARAGRAPHS, chunk=1, interval=100)  # runs for a minute
    places = redis.Redis.from_url(shared.redis.url)
    key = "sse:clients:{127.0.0.1}"
    held: list[httpx.Response] = []
    with httpx.Client(timeout=30) as client:

        def open_on(base: str) -> httpx.Response:
            request = client.build_request("GET", f"{base}/api/streams/{stream_id}")
            return client.send(request, stream=True)

        for base in (first.url, first.url, second.url):
            response = open_on(base)
            assert response.status_code == 200
            held.append(response)
        for base in (first.url, second.url):
            refused = httpx.get(f"{base}/api/streams/{stream_id}")
            assert refused.status_code == 429
            assert "your address" in refused.json()["error"]
            assert refused.headers["retry-after"]
        assert places.zcard(key) == 3

        held.pop(0).close()  # the server notices at its next heartbeat and frees the place
        deadline = time.monotonic() + 5
        while places.zcard(key) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        response = open_on(second.url)
        assert response.status_code == 200
        held.append(response)  # first: 1, second: 2

        # Kill second's workers: their places stay taken until they expire (3 leases).
        _, killed_at = kill_workers(second)
        assert httpx.get(f"{first.url}/api/streams/{stream_id}").status_code == 429
        while time.monotonic() - killed_at < 3 * LEASE + 5:
            probe = open_on(first.url)
            if probe.status_code == 200:
                held.append(probe)
                break
            probe.close()
            time.sleep(0.25)
        freed_after = time.monotonic() - killed_at
        assert held[-1] is probe, "the dead worker's places never came back"
        # Renewed every lease, they expire 3 leases after the last renewal: 2 to 3 after the kill.
        assert 2 * LEASE - 0.5 < freed_after < 3 * LEASE + 3
        for response in held:
            response.close()
    httpx.post(f"{first.url}/api/streams/{stream_id}/cancel", json={})
    deadline = time.monotonic() + 10
    while places.zcard(key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert places.zcard(key) == 0  # every response that ended gave its place back


def test_a_lost_reply_or_a_refusing_redis_never_leaves_a_stream_running(
    redis_server: RedisServer,
) -> None:
    """An append that ran in Redis but whose reply was lost is retried: it is already there, and
    the stream goes on (it used to end the producer silently and leave the stream running, its
    lease renewed, for ever). A Redis that refuses every append: the stream still ends."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.redis_lost_reply", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    outcome = json.loads(result.stdout)
    lost = outcome["lost_replies"]
    assert lost["ended"]
    assert lost["state"] == "done"
    assert lost["local_ids"] == lost["redis_ids"] == list(range(1, 13))  # each once
    assert lost["redis_state"] == "done"
    assert lost["text"] == "".join(f"{i} " for i in range(10))
    refused = outcome["refused"]
    assert refused["ended"]
    assert refused["terminal"]["message"] == "producer stopped"
    assert not refused["still_renewing"]  # its lease lapses: no worker sees it running
    assert "its end could not be written" in result.stderr
    outage = outcome["outage"]
    assert outage["places"] == [""] * 3  # let through: an outage refuses no reader
    assert outage["free"] == outage["size"]  # and the pool is whole
    busy = outcome["busy"]
    assert busy["places"] == [""] * 3  # BUSY: let through too
    assert busy["free"] == busy["size"]  # the pipeline gave its connection back
    assert busy["after"]  # and counted again once Redis is free
    blip = outcome["pipeline_blip"]
    assert sorted(blip["broken"]) == ["_execute_pipeline", "_execute_transaction"]
    assert blip["ended"]
    assert blip["state"] == "done"  # its start was written on the retry
    assert blip["ids"] == list(range(1, 13))
    assert blip["active"] == [False, True, False]


def test_event_names_with_quotes_reach_other_workers(shared: Any) -> None:
    """The Pub/Sub message between workers is JSON made in one place, escaped: an event name
    with a quote or a backslash used to break it, and the worker's Pub/Sub reader with it."""
    events = [['say "hi"', {"n": 1}], ["back\\slash", {"n": 2}], ["plain", {"n": 3}]]
    stream_id = start_stream(shared.a.url, "named", events=events, interval_ms=150, text="end")
    readers = [shared.b.url] * 6  # several, so that every worker of b has a mirror
    with ThreadPoolExecutor(len(readers)) as pool:
        results = list(pool.map(lambda base: read_stream(base, stream_id, timeout=20), readers))
    for result in results:
        got = [(e.type, e.json()) for e in result.events if e.type not in ("start", "done")]
        assert got[:3] == [(name, data) for name, data in events]
        assert result.transcript.text() == "end"
    assert "Pub/Sub reader failed" not in shared.b.log()


def test_every_reader_on_every_worker_gets_start_first(shared: Any) -> None:
    """Readers on a worker whose mirror was made before the first blocks were persisted (and
    trimmed from Redis) begin with ``start`` like everyone else."""
    stream_id = demo(shared.a.url, PARAGRAPHS, chunk=3, interval=15)
    with ThreadPoolExecutor(12) as pool:
        early = [pool.submit(read_stream, shared.b.url, stream_id, timeout=30) for _ in range(6)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until blocks are persisted and trimmed from Redis
            first = shared.redis_client.xrange(f"sse:{{{stream_id}}}:events", count=1)
            if first and int(first[0][0].split(b"-")[0]) > 30:
                break
            time.sleep(0.05)
        late = [pool.submit(read_stream, shared.b.url, stream_id, timeout=30) for _ in range(12)]
        results = [r.result(timeout=60) for r in early + late]
    for result in results:
        assert result.events[0].type == "start", [e.type for e in result.events[:3]]
        assert result.transcript.text() == PARAGRAPHS


def test_readers_everywhere_end_when_redis_loses_its_data(
    server_factory: Any, postgres: PostgresServer
) -> None:
    """A Redis without persistence restarts empty mid-stream (as after FLUSHALL, an eviction or
    a failover that lost writes). The owner is refused ("lost") and ends the stream; readers on
    the other instance, which used to get heartbeats for ever, end too, with the same event;
    and a reader who comes later gets the turn as the database has it."""
    volatile = RedisServer(persistent=False).start()
    try:
        config = shared_config(volatile, postgres)
        owner = server_factory(config, app=LIVE_APP, workers=1)
        other = server_factory(config, app=LIVE_APP, workers=1)
        stream_id = demo(owner.url, PARAGRAPHS * 2, chunk=2, interval=15)
        pool = ThreadPoolExecutor(4)
        bases = [owner.url, owner.url, other.url, other.url]
        readers = [pool.submit(read_stream, base, stream_id, timeout=60) for base in bases]
        time.sleep(1.5)
        volatile.restart(down_for=3)  # back empty
        back = time.monotonic()
        try:
            results = [
                r.result(timeout=max(1.0, back + 10 * LEASE - time.monotonic())) for r in readers
            ]
        except TimeoutError:  # heartbeats would keep them open for ever: end the test
            owner.stop()
            other.stop()
            raise AssertionError("readers still open 10 leases after Redis came back") from None
        finally:
            pool.shutdown(wait=True)
        ends = {(r.events[-1].id, r.events[-1].type, r.events[-1].data) for r in results}
        assert len(ends) == 1  # the same end on both instances
        assert next(iter(ends))[1] == "error"
        for base in (owner.url, other.url):
            status = httpx.get(f"{base}/api/streams/{stream_id}/status").json()
            assert status["state"] == "error"
        stored = read_stream(other.url, stream_id)  # from the database now
        assert stored.transcript.text() == results[0].transcript.text()
        for result in results:
            assert result.transcript.text() == stored.transcript.text()
            assert result.transcript.ids == sorted(set(result.transcript.ids))
            again = httpx.get(
                f"{other.url}/api/streams/{stream_id}",
                headers={"Last-Event-ID": str(result.events[-1].id)},
            )
            assert again.status_code == 204  # it holds the end: nothing more
        owner.stop()
        other.stop()
    finally:
        volatile.remove()


def test_a_producers_events_of_one_pause_take_one_script_call(redis_server: RedisServer) -> None:
    """Five events before each of 20 pauses: one append script call per pause (and one each
    for the start and the end), every event in Redis once, in order, as in the owner's
    buffer."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.redis_calls", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    outcome = json.loads(result.stdout)
    events = 2 + 5 * outcome["pauses"]
    assert outcome["xadds"] == events
    assert outcome["ids"] == outcome["buffer"] == list(range(1, events + 1))
    assert outcome["events"][0] == "start"
    assert outcome["events"][-1] == "done"
    assert outcome["script_calls"] <= outcome["pauses"] + 2
