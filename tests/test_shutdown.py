"""Graceful shutdown on real gunicorn: SIGTERM with many open streams, then resume elsewhere.

gunicorn's ``graceful_timeout`` is 30 s (``gunicorn.conf.py``); the servers here give producers
``SSE_SHUTDOWN_TIMEOUT`` = 2 s. Without the shutdown hooks a worker with open streams or idle
keep-alive connections waits the whole 30 s and is then killed.
"""

from __future__ import annotations

import random
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import (
    LIVE_APP,
    LiveServer,
    PostgresServer,
    ReadResult,
    read_stream,
    start_stream,
)
from tests.helpers.sse_parser import Transcript

STREAMS = 200
GRACE = 2.0
SHORT = "A short reply that ends well within the grace period."
ENDLESS = 100_000  # deltas of a stream that only a shutdown ends (one every 100 ms)
ENDLESS_TEXT = "".join(chr(ord("a") + i % 26) * 4 for i in range(ENDLESS))  # the flood's text


def _idle_keepalive(url: str) -> socket.socket:
    """A connection that made one request and now idles (as browsers keep them)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before answering"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:  # the body may come in later segments on a loaded machine
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    assert len(body) == length
    return sock


def _sigterm_and_time(server: LiveServer, idle: socket.socket) -> tuple[float, float]:
    """SIGTERM the arbiter; return (when the idle connection closed, when gunicorn exited)."""
    assert server.proc is not None
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    idle.settimeout(30)
    assert idle.recv(1) == b""
    idle_closed = time.monotonic() - sent
    server.proc.wait(timeout=40)
    exited = time.monotonic() - sent
    server.stop()
    return idle_closed, exited


def test_sigterm_with_200_open_streams_is_quick_and_loses_nothing(
    server_factory: Any, postgres: PostgresServer
) -> None:
    name = "sd_" + uuid.uuid4().hex[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    config = {
        "SSE_DATABASE_URL": postgres.url.rsplit("/", 1)[0] + f"/{name}",
        "SSE_SHUTDOWN_TIMEOUT": GRACE,
        "SSE_HEARTBEAT_INTERVAL": 1,
        "SSE_MAX_STREAMS_PER_ADDRESS": STREAMS,  # all from this one test client
    }
    first: LiveServer = server_factory(config, app=LIVE_APP)
    texts: dict[str, str] = {}  # what each stream sends in all
    for i in range(STREAMS):
        if i % 10 == 0:  # 20 finish within the grace
            texts[start_stream(first.url, "demo", text=SHORT, chunk_size=4, interval_ms=30)] = SHORT
        else:  # 180 would run for hours: only the shutdown ends them
            sid = start_stream(first.url, "flood", count=ENDLESS, size=4, interval_ms=100)
            texts[sid] = ENDLESS_TEXT
    with ThreadPoolExecutor(STREAMS) as pool:
        readers = {sid: pool.submit(read_stream, first.url, sid, timeout=60) for sid in texts}
        idle = _idle_keepalive(first.url)
        time.sleep(1.0)
        idle_closed, exited = _sigterm_and_time(first, idle)
        live: dict[str, ReadResult] = {sid: r.result(timeout=30) for sid, r in readers.items()}

    # Quick: idle connections closed at once, the worker gone soon after the producers' grace
    # (gunicorn itself would wait graceful_timeout = 30 s).
    assert idle_closed < 1.5
    assert exited < GRACE + 8
    assert "Worker graceful timeout" not in first.log()

    # Every response ended cleanly (a complete chunked body) with its stream's terminal event.
    done = stopped = 0
    for sid, result in live.items():
        terminal = result.events[-1]
        if texts[sid] is SHORT:
            assert terminal.type == "done"  # finished within the grace, never cut short
        if terminal.type == "done":
            done += 1
            assert result.transcript.text() == texts[sid]
        else:
            stopped += 1
            assert terminal.type == "error"
            assert terminal.json()["message"] == "server shutting down"
            assert texts[sid].startswith(result.transcript.text())
    assert done == STREAMS // 10
    assert stopped == STREAMS - STREAMS // 10

    # A restarted server has all of it: resumes from a random id are exact, the end is a 204.
    second: LiveServer = server_factory(config, app=LIVE_APP)
    rng = random.Random(7)

    def resume(sid: str) -> None:
        seen = live[sid]
        cut = rng.randrange(len(seen.events))
        resumed = Transcript()
        for event in seen.events[:cut]:
            resumed.apply(event.id, event.type, event.json())
        last = seen.events[cut - 1].id if cut else None
        rest = read_stream(second.url, sid, last)
        assert rest.status == 200
        for event in rest.events:
            resumed.apply(event.id, event.type, event.json())
        assert resumed.text() == seen.transcript.text()
        assert resumed.terminal == seen.events[-1].type
        assert read_stream(second.url, sid, seen.events[-1].id).status == 204

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(resume, live))
    status = httpx.get(f"{second.url}/api/streams/{next(iter(live))}/status").json()
    assert status["state"] in ("done", "error")
