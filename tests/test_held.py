"""Held readers on real gunicorn: idle clients kept with no greenlet each (``sse_blueprint._held``).

Each test reads the wire itself (raw sockets): the events in order, the heartbeats, the chunked
body's end, and that the server closes a held connection after it. Counts come from the live
app's ``/test/resources``, waited for (never read at a chosen moment).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import LIVE_APP, LiveServer, start_stream, wait_done
from tests.helpers.http1 import open_stream, read_response, read_until
from tests.helpers.sse_parser import SSEParser, Transcript

READERS = 20


def resources(server: LiveServer) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{server.url}/test/resources", timeout=10).json()
    return found


def wait_for(
    server: LiveServer, check: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        now = resources(server)
        if check(now):
            return now
        assert time.monotonic() < deadline, f"never reached: {now}"
        time.sleep(0.05)


def ticks(count: int, interval_ms: int) -> dict[str, Any]:
    """A ``named`` stream: ``count`` tick events ``interval_ms`` apart, then its text."""
    return {
        "events": [["tick", {"n": i}] for i in range(count)],
        "interval_ms": interval_ms,
        "text": "end",
    }


def test_idle_readers_are_held_without_a_greenlet_and_get_every_event_and_the_end(
    server_factory: Any,
) -> None:
    server: LiveServer = server_factory({"SSE_HEARTBEAT_INTERVAL": 0.3}, app=LIVE_APP)
    before = wait_for(server, lambda r: r["clients_by_address"] == 0)
    stream_id = start_stream(server.url, "named", **ticks(4, 1500))
    socks = [open_stream(server.url, f"/api/streams/{stream_id}") for _ in range(READERS)]
    socks.append(open_stream(server.url, f"/api/streams/{stream_id}?format=ndjson"))
    during = wait_for(server, lambda r: r["held"] == READERS + 1)
    assert during["readers"] == during["clients_by_address"] == READERS + 1
    # One greenlet per reader would be 21 more; held, they have none (the producer, the
    # heartbeats and the write watch are the few there are).
    assert during["greenlets"] - before["greenlets"] < 10, (before, during)
    bodies = [read_response(sock) for sock in socks]
    status = wait_done(server.url, stream_id)
    for sock in socks:
        sock.close()
    for head, body, closed in bodies[:READERS]:
        assert b"text/event-stream" in head
        events = SSEParser().feed(body, final=True)
        assert [e.id for e in events] == list(range(1, len(events) + 1))  # each once, in order
        assert [e.json()["n"] for e in events if e.type == "tick"] == [0, 1, 2, 3]
        assert events[-1].type == "done" == status["state"]
        assert closed, "a held connection stays open after its response"
    head, body, closed = bodies[READERS]
    assert b"application/x-ndjson" in head
    assert closed
    lines = [line for line in body.split(b"\n") if line]
    assert [httpx.Response(200, content=line).json()["event"] for line in lines][-1] == "done"
    after = wait_for(server, lambda r: r["held"] == 0 and r["clients_by_address"] == 0)
    assert after["readers"] == 0
    assert after["fds"] <= before["fds"] + 2  # every held socket was closed


def test_held_readers_get_heartbeats(server_factory: Any) -> None:
    server: LiveServer = server_factory({"SSE_HEARTBEAT_INTERVAL": 0.2}, app=LIVE_APP)
    stream_id = start_stream(server.url, "named", **ticks(2, 8000))
    with open_stream(server.url, f"/api/streams/{stream_id}") as sock:
        data = read_until(sock, b"", b"event: tick")
        wait_for(server, lambda r: r["held"] == 1)
        at = len(data)
        while data.count(b": heartbeat\n\n", at) < 2:  # two, after it was held
            data = read_until(sock, data, b": heartbeat\n\n")
            data += sock.recv(65536)
        httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
        _, body, closed = read_response(sock, data)
    assert SSEParser().feed(body, final=True)[-1].type == "cancelled"
    assert closed
    wait_for(server, lambda r: r["held"] == 0 and r["readers"] == 0)


def test_a_held_reader_whose_client_went_away_is_released(server_factory: Any) -> None:
    server: LiveServer = server_factory({"SSE_HEARTBEAT_INTERVAL": 0.2}, app=LIVE_APP)
    before = wait_for(server, lambda r: r["clients_by_address"] == 0)
    stream_id = start_stream(server.url, "named", **ticks(2, 20000))
    socks = [open_stream(server.url, f"/api/streams/{stream_id}") for _ in range(10)]
    for sock in socks:
        read_until(sock, b"", b"event: tick")
    wait_for(server, lambda r: r["held"] == 10)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset: the next heartbeat fails
    after = wait_for(server, lambda r: r["held"] == 0 and r["clients_by_address"] == 0)
    assert after["readers"] == 0
    assert after["running"] == 1  # the producer carries on
    assert after["fds"] <= before["fds"] + 2
    httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
    wait_done(server.url, stream_id)


def test_a_held_reader_behind_a_full_socket_gets_every_byte(server_factory: Any) -> None:
    """Deltas bigger than the socket takes reach a held reader whose client reads slowly: the
    fan-out writes a part, a greenlet of the reader's own the rest, then it is held again."""
    server: LiveServer = server_factory({"SSE_HEARTBEAT_INTERVAL": 0.2}, app=LIVE_APP)
    count, size = 40, 500_000
    stream_id = start_stream(server.url, "flood", count=count, size=size, interval_ms=100)
    with open_stream(server.url, f"/api/streams/{stream_id}", rcvbuf=8192) as sock:
        data = read_until(sock, b"", b": heartbeat")  # idle once: held
        time.sleep(2.0)  # deltas pile up behind a socket nobody reads
        _, body, closed = read_response(sock, data)
    assert closed
    events = SSEParser().feed(body, final=True)
    assert [e.id for e in events] == list(range(1, len(events) + 1))  # each once, in order
    transcript = Transcript()
    for event in events:
        transcript.apply(event.id, event.type, event.json())
    assert transcript.text() == "".join(chr(ord("a") + i % 26) * size for i in range(count))
    assert events[-1].type == "done"
    wait_for(server, lambda r: r["held"] == 0 and r["clients_by_address"] == 0)


def test_readers_are_not_held_when_turned_off(server_factory: Any) -> None:
    server: LiveServer = server_factory({"SSE_HOLD_IDLE_READERS": False}, app=LIVE_APP)
    stream_id = start_stream(server.url, "named", **ticks(2, 3000))
    with open_stream(server.url, f"/api/streams/{stream_id}") as sock:
        read_until(sock, b"", b"event: tick")
        found = wait_for(server, lambda r: r["parked"] == 1)
        assert found["held"] == 0
    httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
    wait_done(server.url, stream_id)
