"""The HTTP and event contract (../shared/CONTRACT.md) against a real gunicorn gevent worker."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import (
    DEMO_TEXT,
    LIVE_APP,
    LiveServer,
    cancel_reaches_every_reader,
    read_ndjson,
    read_stream,
    start_demo,
    start_stream,
    wait_done,
)
from tests.helpers.sse_parser import ParsedEvent, SSEParser, Transcript


def test_response_starts_with_retry_and_has_sse_headers(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    result = read_stream(server.url, stream_id)
    assert result.status == 200
    assert result.raw.startswith(b"retry: 1500\n\n")
    assert result.parser.retry == 1500
    assert result.headers["content-type"] == "text/event-stream"
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert "access-control-allow-origin" not in result.headers  # CORS is off by default
    events = result.events
    assert events[0].type == "start"
    assert events[0].json()["stream_id"] == stream_id
    assert events[-1].type == "done"
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))  # strictly increasing
    assert result.transcript.text() == DEMO_TEXT


def test_concurrent_clients_all_rebuild_the_text(server: LiveServer) -> None:
    stream_id = start_demo(server.url, chunk_size=3, interval_ms=10)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: read_stream(server.url, stream_id), range(8)))
    for result in results:
        assert result.transcript.text() == DEMO_TEXT
        assert result.transcript.terminal == "done"
        assert len(set(result.transcript.delta_ids)) == len(result.transcript.delta_ids)
        # Strictly increasing ids, ending at the same terminal event. (Not the same ids for
        # everyone: a client that joins after a block was persisted and trimmed gets it whole
        # as one turnblock_catchup.)
        assert result.transcript.ids == sorted(set(result.transcript.ids))
    assert len({r.transcript.ids[-1] for r in results}) == 1


def test_resume_from_every_event_id_rebuilds_the_text(server: LiveServer) -> None:
    """Blocks end (and are persisted and trimmed) as the demo goes: early ids catch up."""
    stream_id = start_demo(server.url, chunk_size=9, interval_ms=0)
    full = read_stream(server.url, stream_id).events
    terminal_id = full[-1].id
    catchups = 0
    for k in range(terminal_id):
        resumed = read_stream(server.url, stream_id, last_event_id=k)
        assert resumed.status == 200
        client = Transcript()  # what the client had applied up to k, then what it receives
        for event in full:
            if event.id <= k:
                client.apply(event.id, event.type, event.json())
        ids = [e.id for e in resumed.events]
        assert ids == sorted(set(ids))
        assert all(i > k for i in ids)
        for event in resumed.events:
            client.apply(event.id, event.type, event.json())
        assert client.text() == DEMO_TEXT, k
        assert len(client.delta_ids) == len(set(client.delta_ids)), k
        assert resumed.events[-1].type == "done"
        if any(e.type == "turnblock_catchup" for e in resumed.events):
            catchups += 1
        elif not any(e.type == "turnblock_catchup" for e in full):
            # Both served from the buffer: exactly the events after k.
            assert [(e.id, e.type, e.data) for e in resumed.events] == [
                (e.id, e.type, e.data) for e in full if e.id > k
            ]
    assert catchups > 0  # the finished stream is trimmed: early positions come from the store


def test_reconnect_mid_stream_many_times_rebuilds_the_text(server: LiveServer) -> None:
    stream_id = start_demo(server.url, chunk_size=2, interval_ms=8)

    def reader(seed: int) -> tuple[Transcript, int]:
        rng = random.Random(seed)
        client = Transcript()
        reconnects = 0
        while client.terminal is None:
            result = read_stream(
                server.url, stream_id, client.last_id or None, stop_after=rng.randint(1, 12),
                tolerate_cuts=True,  # a loaded machine makes laggards (queue 32): they resume
            )  # fmt: skip
            for event in result.events:
                client.apply(event.id, event.type, event.json())
            reconnects += 1
        return client, reconnects

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(reader, range(4)))
    for client, reconnects in outcomes:
        # (How many reconnects fell before the end depends on the machine's pace: the stream
        # may be over, and caught up in a few events, after the first ones.)
        assert reconnects >= 1
        assert client.text() == DEMO_TEXT
        assert len(client.delta_ids) == len(set(client.delta_ids))
        assert client.ids == sorted(set(client.ids))


def test_heartbeat_comments_on_an_idle_stream(server: LiveServer) -> None:
    stream_id = start_demo(server.url, text="slow", chunk_size=1, interval_ms=1400)
    result = read_stream(server.url, stream_id, stop_after=3, timeout=10)  # start, "s", "l"
    assert result.parser.comments.count(" heartbeat") >= 2  # every 0.5 s between 1.4 s events
    httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})


def test_204_once_the_client_holds_the_terminal_event(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    events = read_stream(server.url, stream_id).events
    terminal_id = events[-1].id
    for last in (terminal_id, terminal_id + 1, 10**15):
        response = httpx.get(
            f"{server.url}/api/streams/{stream_id}", headers={"Last-Event-ID": str(last)}
        )
        assert response.status_code == 204
        assert response.content == b""
        assert response.headers["content-type"] == "text/event-stream"
    via_query = httpx.get(
        f"{server.url}/api/streams/{stream_id}", params={"last_event_id": terminal_id}
    )
    assert via_query.status_code == 204
    # One before the terminal: exactly the terminal event.
    tail = read_stream(server.url, stream_id, terminal_id - 1)
    assert [(e.id, e.type) for e in tail.events] == [(terminal_id, "done")]


@pytest.mark.parametrize(
    "path",
    [
        "/api/streams/AAAAAAAAAAAAAAAAAAAAAA",
        "/api/streams/AAAAAAAAAAAAAAAAAAAAAA/status",
        "/api/streams/AAAAAAAAAAAAAAAAAAAAAA/cancel",
        "/api/streams/..%2F..%2Fetc%2Fpasswd",
        "/api/streams/../../etc/passwd",
        "/api/streams/" + "x" * 300,
        "/api/streams/a.b",
        "/api/streams/x/y/z",
    ],
)
def test_unknown_streams_are_404_json(server: LiveServer, path: str) -> None:
    method = "POST" if path.endswith("/cancel") else "GET"
    response = httpx.request(method, server.url + path, json={} if method == "POST" else None)
    if path == "/api/streams/../../etc/passwd":
        assert response.status_code == 404  # normalized away by the client: not our route
        return
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


def raw_get(server: LiveServer, path: str, header_bytes: bytes = b"") -> tuple[int, bytes]:
    """Send a hand-made request (bytes httpx would refuse) and return the status and body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + header_bytes + b"\r\n"
        )  # fmt: skip
        sock.settimeout(3)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 4096:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass  # a live stream: headers arrived, the body goes on
    status = int(data.split(b" ", 2)[1])
    return status, data


HOSTILE_IDS = ["abc", "-1", "9" * 200, "1e5", "0x10", "١٢", "1.5", "+3", "99999999999999999"]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_last_event_id_never_5xx(server: LiveServer, value: str) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    wait_done(server.url, stream_id)
    url = f"{server.url}/api/streams/{stream_id}"
    for response in (
        httpx.get(url, headers={b"Last-Event-ID": value.encode()}),
        httpx.get(url, params={"last_event_id": value}),
    ):
        assert response.status_code < 500
        if response.status_code >= 400:
            assert response.status_code == 400
            assert "error" in response.json()


@pytest.mark.parametrize(
    "header",
    [
        b"Last-Event-ID: \x00",
        b"Last-Event-ID: 1\x002",
        b"Last-Event-ID:",
        b"Last-Event-ID:   ",
        b"",
    ],
)
def test_raw_hostile_headers_never_5xx(server: LiveServer, header: bytes) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    wait_done(server.url, stream_id)
    status, _ = raw_get(server, f"/api/streams/{stream_id}", header + b"\r\n" if header else b"")
    assert status < 500
    status, _ = raw_get(server, f"/api/streams/{stream_id}?last_event_id=%00")
    assert status == 400


INJECTIONS = ["%0D%0AX-Injected:%20yes", "%0AX-Injected:%20yes", "%0D%0A%0D%0A<script>"]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_crlf_injection_never_reaches_the_response(server_factory: Any, payload: str) -> None:
    """Encoded CR/LF in the query, the stream id, the format and (raw) in headers: a 4xx JSON
    answer and no header of the attacker's making, also where a header echoes input (CORS)."""
    srv: LiveServer = server_factory({"SSE_CORS_ORIGINS": "https://app.example"}, app=LIVE_APP)
    stream_id = start_demo(srv.url, interval_ms=0)
    wait_done(srv.url, stream_id)
    paths = [
        f"/api/streams/{stream_id}?last_event_id=1{payload}",
        f"/api/streams/{stream_id}?format=sse{payload}",
        f"/api/streams/{stream_id}{payload}",
        f"/api/streams/{stream_id}{payload}/status",
    ]
    for path in paths:
        status, data = raw_get(srv, path)
        head, _, body = data.partition(b"\r\n\r\n")
        assert 400 <= status < 500, (path, status)
        assert b"x-injected" not in head.lower()
        assert b"<script>" not in head
        assert b'"error"' in body
    for header in (
        b"Origin: https://app.example\rX-Injected: yes",
        b"Last-Event-ID: 1\rX-Injected: yes",
        b"Last-Event-ID: 1\nX-Injected: yes",
    ):
        status, data = raw_get(srv, f"/api/streams/{stream_id}", header + b"\r\n")
        assert status < 500
        assert b"\r\nx-injected" not in data.partition(b"\r\n\r\n")[0].lower()
    response = httpx.post(
        f"{srv.url}/api/streams", json={"producer": "demo\r\nX-Injected: yes", "input": {}}
    )
    assert response.status_code == 400
    assert "x-injected" not in {k.lower() for k in response.headers}


def test_empty_last_event_id_means_from_the_start(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    result = read_stream(server.url, stream_id, "")
    assert result.events[0].type == "start"
    assert result.transcript.text() == DEMO_TEXT


def test_future_last_event_id_on_a_running_stream(server: LiveServer) -> None:
    stream_id = start_demo(server.url, chunk_size=50, interval_ms=100)
    result = read_stream(server.url, stream_id, 10**6, timeout=20)
    assert result.status == 200
    assert result.events == []  # nothing after the claimed id; the response ends with the stream
    response = httpx.get(
        f"{server.url}/api/streams/{stream_id}", headers={"Last-Event-ID": str(10**6)}
    )
    assert response.status_code == 204


def test_header_wins_over_query_parameter(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    wait_done(server.url, stream_id)
    terminal_id = read_stream(server.url, stream_id).events[-1].id
    both = read_stream(server.url, stream_id, terminal_id - 1, params={"last_event_id": "2"})
    assert [e.id for e in both.events] == [terminal_id]


def test_cancel_gives_every_reader_cancelled(server: LiveServer) -> None:
    stream_id = start_demo(server.url, chunk_size=1, interval_ms=50)
    cancel_reaches_every_reader(server.url, stream_id, [server.url] * 4, after=0.5)
    status = httpx.get(f"{server.url}/api/streams/{stream_id}/status").json()
    assert status["state"] == "cancelled"
    assert status["finished_at"] is not None
    again = httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
    assert again.status_code == 200
    assert again.json()["state"] == "cancelled"


def test_cancel_after_done_is_200_and_keeps_done(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    wait_done(server.url, stream_id)
    response = httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
    assert response.status_code == 200
    assert response.json()["state"] == "done"


def test_status_reports_state_and_last_event_id(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    status = wait_done(server.url, stream_id)
    events = read_stream(server.url, stream_id).events
    assert status["stream_id"] == stream_id
    assert status["state"] == "done"
    assert status["last_event_id"] == events[-1].id
    assert status["producer"] == "demo"


@pytest.mark.parametrize(
    "how", [{"headers": {"Accept": "application/x-ndjson"}}, {"params": {"format": "ndjson"}}]
)
def test_ndjson_rebuilds_the_same_text(server: LiveServer, how: dict[str, Any]) -> None:
    stream_id = start_demo(server.url, chunk_size=4, interval_ms=20)
    with ThreadPoolExecutor(2) as pool:  # both join before the first block is trimmed
        ndjson = pool.submit(read_ndjson, server.url, stream_id, **how)
        sse = pool.submit(read_stream, server.url, stream_id)
        response, lines = ndjson.result()
        sse_events = sse.result().events
    assert response.headers["content-type"] == "application/x-ndjson"
    transcript = Transcript()
    for line in lines:
        assert set(line) == {"id", "event", "data"}
        transcript.apply(line["id"], line["event"], line["data"])
    assert transcript.text() == DEMO_TEXT
    assert [(e.id, e.type, e.json()) for e in sse_events] == [
        (x["id"], x["event"], x["data"]) for x in lines
    ]
    _, tail = read_ndjson(server.url, stream_id, params={"format": "ndjson", "last_event_id": "3"})
    resumed = Transcript()
    for line in lines:
        if line["id"] <= 3:
            resumed.apply(line["id"], line["event"], line["data"])
    for line in tail:
        assert line["id"] > 3
        resumed.apply(line["id"], line["event"], line["data"])
    assert resumed.text() == DEMO_TEXT


def test_unknown_format_is_400(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    response = httpx.get(f"{server.url}/api/streams/{stream_id}", params={"format": "xml"})
    assert response.status_code == 400
    assert "format" in response.json()["error"]


def test_frozen_client_is_cut_while_a_normal_client_gets_everything(server: LiveServer) -> None:
    """SSE_CLIENT_QUEUE is 32 on this server; 400 events of 20 kB overflow any socket buffer.

    (At 4 MB/s, which the test's own pure-Python reader keeps up with on a busy machine.)
    """
    stream_id = start_stream(server.url, "flood", count=400, size=20_000, interval_ms=5)
    host, port = server.url.removeprefix("http://").split(":")
    frozen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frozen.connect((host, int(port)))
    frozen.sendall(f"GET /api/streams/{stream_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    normal = read_stream(server.url, stream_id, timeout=60)  # reads while the other one sleeps
    flood = "".join(chr(ord("a") + i % 26) * 20_000 for i in range(400))
    assert normal.transcript.text() == flood  # all of it, in one response: it was not cut
    assert normal.events[-1].type == "done"
    # The frozen client was cut: its connection ends without the terminal event...
    frozen.settimeout(10)
    raw = b""
    try:
        while chunk := frozen.recv(1 << 20):
            raw += chunk
    except ConnectionResetError:
        pass
    frozen.close()
    body = raw.split(b"\r\n\r\n", 1)[1]
    parser = SSEParser()
    got = parser.feed(_dechunk(body))
    assert got, "the frozen client should have received a first part"
    assert got[-1].type not in ("done", "error", "cancelled")
    assert [e.id for e in got] == list(range(1, len(got) + 1))
    # ...and it resumes from its last id with nothing lost.
    rest = read_stream(server.url, stream_id, got[-1].id)
    client = Transcript()
    for event in got + rest.events:
        client.apply(event.id, event.type, event.json())
    assert client.text() == normal.transcript.text()
    assert client.ids == sorted(set(client.ids))
    assert client.terminal == "done"
    assert httpx.get(f"{server.url}/api/streams/{stream_id}/status").json()["subscribers"] == 0


def _frozen_client(url: str, stream_id: str) -> socket.socket:
    """A client that sends its request and then never reads (a 4 KB receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    request = f"GET /api/streams/{stream_id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    sock.sendall(request.encode())
    return sock


def _drain_socket(sock: socket.socket, timeout: float = 10) -> list[ParsedEvent]:
    """Everything the server sent before it closed the connection, as events."""
    sock.settimeout(timeout)
    raw = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            raw += chunk
    sock.close()
    return SSEParser().feed(_dechunk(raw.split(b"\r\n\r\n", 1)[1]))


def test_frozen_clients_slow_neither_the_producer_nor_other_readers(server: LiveServer) -> None:
    """A paced flood with 6 clients that read nothing until it is over: the producer finishes
    and a normal reader gets all of it meanwhile, so neither waited for the frozen ones (which
    are cut for lagging). The producer never writes to a socket: it appends to the shared
    buffer, and each reader's own greenlet does the writing."""
    flood = "".join(chr(ord("a") + i % 26) * 20_000 for i in range(400))
    stream_id = start_stream(server.url, "flood", count=400, size=20_000, interval_ms=5)
    sockets = [_frozen_client(server.url, stream_id) for _ in range(6)]
    normal = Transcript()
    while normal.terminal is None:  # (a loaded machine can make it lag too: it resumes)
        got = read_stream(server.url, stream_id, normal.last_id, timeout=60, tolerate_cuts=True)
        for event in got.events:
            normal.apply(event.id, event.type, event.json())
    assert normal.text() == flood
    assert normal.terminal == "done"
    assert httpx.get(f"{server.url}/api/streams/{stream_id}/status").json()["state"] == "done"
    frozen = [_drain_socket(s) for s in sockets]  # read only now, after the end
    for events in frozen:  # each was cut: its response ends without the terminal event
        assert events[-1].type not in ("done", "error", "cancelled")


def test_a_client_frozen_at_the_end_of_a_stream_is_cut_by_the_write_timeout(
    server: LiveServer,
) -> None:
    """28 events of 300 kB: the frozen client blocks with fewer than SSE_CLIENT_QUEUE (32)
    events left, so the lag check never cuts it; SSE_WRITE_TIMEOUT (2 s here) does."""
    stream_id = start_stream(server.url, "flood", count=28, size=300_000)
    frozen = _frozen_client(server.url, stream_id)
    normal = read_stream(server.url, stream_id, timeout=60)
    assert normal.events[-1].type == "done"
    time.sleep(3)  # the frozen client's write has been blocked for longer than 2 s now
    events = _drain_socket(frozen)
    assert events
    assert events[-1].type not in ("done", "error", "cancelled")
    status = httpx.get(f"{server.url}/api/streams/{stream_id}/status").json()
    assert status["subscribers"] == 0


def _dechunk(body: bytes) -> bytes:
    """Decode as much of an HTTP/1.1 chunked body as arrived."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line, 16)
        except ValueError:
            break
        if size == 0 or len(rest) < size:
            out += rest[:size]
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def test_producer_errors_end_with_an_error_event(server: LiveServer) -> None:
    hidden = read_stream(server.url, start_stream(server.url, "fail"))
    assert hidden.events[0].type == "start"
    assert hidden.transcript.text() == "partial"
    assert hidden.events[-1].type == "error"
    assert hidden.events[-1].json()["message"] == "producer failed"  # no internals leak
    shown = read_stream(server.url, start_stream(server.url, "fail", visible=True))
    assert shown.events[-1].json()["message"] == "the model refused"


BAD_CREATES: list[tuple[Any, str | None]] = [
    (b"{not json", None),
    (b"", None),
    (b"[1, 2]", None),
    (b'"demo"', None),
    ({"input": {}}, "producer"),
    ({"producer": 5}, "producer"),
    ({"producer": "nope"}, "unknown producer"),
    ({"producer": "demo", "input": []}, "input"),
    ({"producer": "demo", "input": {"text": 5}}, "text"),
    ({"producer": "demo", "input": {"text": "x", "chunk_size": 0}}, "chunk_size"),
    ({"producer": "demo", "input": {"text": "x", "chunk_size": True}}, "chunk_size"),
    ({"producer": "demo", "input": {"text": "x", "chunk_size": "3"}}, "chunk_size"),
    ({"producer": "demo", "input": {"text": "x", "interval_ms": -1}}, "interval_ms"),
    ({"producer": "demo", "input": {"text": "x", "interval_ms": 1.5}}, "interval_ms"),
    (b'{"producer": "demo", "input": {"text": "\\ud800"}}', "Unicode"),
]


@pytest.mark.parametrize(("body", "needle"), BAD_CREATES)
def test_bad_create_requests_are_400_json(
    server: LiveServer, body: Any, needle: str | None
) -> None:
    url = f"{server.url}/api/streams"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    if needle:
        assert needle in error


def test_oversized_create_body_is_413_json(server: LiveServer) -> None:
    text = "x" * (2 << 20)
    response = httpx.post(
        f"{server.url}/api/streams", json={"producer": "demo", "input": {"text": text}}
    )
    assert response.status_code == 413
    assert "error" in response.json()


def test_wrong_methods_are_405_json(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    for method, path in [
        ("GET", "/api/streams"),
        ("DELETE", f"/api/streams/{stream_id}"),
        ("POST", f"/api/streams/{stream_id}"),
        ("GET", f"/api/streams/{stream_id}/cancel"),
        ("PUT", f"/api/streams/{stream_id}/status"),
        ("TRACE", f"/api/streams/{stream_id}"),
        ("CONNECT", f"/api/streams/{stream_id}/status"),
        ("BREW", "/api/streams"),
    ]:
        response = httpx.request(method, server.url + path)
        assert response.status_code == 405, (method, path)
        assert response.headers["content-type"] == "application/json", (method, path)
        assert "error" in response.json()
        assert response.headers["allow"]


def test_gunicorn_worker_sets_the_gc_thresholds(server: LiveServer, server_factory: Any) -> None:
    """The hooks set SSE_GC_THRESHOLDS in the worker (default 50000,50,10); empty keeps
    Python's own."""
    assert httpx.get(f"{server.url}/test/resources").json()["gc_threshold"] == [50_000, 50, 10]
    own = server_factory({"SSE_GC_THRESHOLDS": ""}, app=LIVE_APP)
    assert httpx.get(f"{own.url}/test/resources").json()["gc_threshold"] == [700, 10, 10]
    tuned = server_factory({"SSE_GC_THRESHOLDS": "20000,20,20"}, app=LIVE_APP)
    assert httpx.get(f"{tuned.url}/test/resources").json()["gc_threshold"] == [20_000, 20, 20]


def test_cors_headers_only_for_configured_origins(server_factory: Any) -> None:
    cors = server_factory(
        {"SSE_CORS_ORIGINS": "https://app.example, https://other.example/"},
        app=LIVE_APP,
    )
    stream_id = start_demo(cors.url, interval_ms=0)
    url = f"{cors.url}/api/streams/{stream_id}/status"
    allowed = httpx.get(url, headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in allowed.headers["vary"]
    refused = httpx.get(url, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    preflight = httpx.request(
        "OPTIONS",
        f"{cors.url}/api/streams",
        headers={
            "Origin": "https://other.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://other.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "Content-Type" in preflight.headers["access-control-allow-headers"]
    stream = read_stream(cors.url, stream_id, headers={"Origin": "https://app.example"})
    assert stream.headers["access-control-allow-origin"] == "https://app.example"


def test_no_hop_by_hop_headers_from_the_app(server: LiveServer) -> None:
    stream_id = start_demo(server.url, interval_ms=0)
    status, raw = raw_get(server, f"/api/streams/{stream_id}")
    head = raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert status == 200
    # gunicorn adds its own Connection/Transfer-Encoding; the app sets none of them twice.
    assert head.count("connection:") <= 1
    assert "keep-alive:" not in head


def test_client_limits_per_stream_and_per_address(server_factory: Any) -> None:
    limited: LiveServer = server_factory(
        {
            "SSE_MAX_CLIENTS_PER_STREAM": 2,
            "SSE_MAX_CLIENTS_PER_ADDRESS": 3,
            "SSE_HEARTBEAT_INTERVAL": 0.3,
        },
        app=LIVE_APP,
    )
    slow = [start_demo(limited.url, chunk_size=1, interval_ms=200) for _ in range(2)]
    held = []
    with httpx.Client(timeout=30) as client:
        for stream_id in (slow[0], slow[0]):
            response = client.send(
                client.build_request("GET", f"{limited.url}/api/streams/{stream_id}"), stream=True
            )
            assert response.status_code == 200
            held.append(response)
        third = httpx.get(f"{limited.url}/api/streams/{slow[0]}")
        assert third.status_code == 429
        assert third.headers["retry-after"]
        assert "too many clients" in third.json()["error"]
        other = client.send(
            client.build_request("GET", f"{limited.url}/api/streams/{slow[1]}"), stream=True
        )
        assert other.status_code == 200  # the third open stream from this address
        held.append(other)
        fourth = httpx.get(f"{limited.url}/api/streams/{slow[1]}")
        assert fourth.status_code == 429
        assert "your address" in fourth.json()["error"]
        for response in held:
            response.close()
    time.sleep(1)  # the server notices at its next heartbeat and frees the places
    again = read_stream(limited.url, slow[0], stop_after=2)
    assert again.status == 200
    for stream_id in slow:
        httpx.post(f"{limited.url}/api/streams/{stream_id}/cancel", json={})


def test_httpx_sse_reads_a_stream_and_its_204(server: LiveServer) -> None:
    """httpx-sse, a common Python SSE client, checks the type of every answer (a 204 typed
    text/html made it raise) and yields the leading retry block as an event with empty data,
    which the README says how to skip."""
    import httpx_sse

    stream_id = start_demo(server.url, interval_ms=0)
    url = f"{server.url}/api/streams/{stream_id}"
    with httpx.Client() as client:
        with httpx_sse.connect_sse(client, "GET", url) as source:
            events = [sse for sse in source.iter_sse() if sse.data]  # skip the retry block
        assert events[0].event == "start"
        assert events[-1].event == "done"
        turn = Transcript()
        for sse in events:
            turn.apply(int(sse.id), sse.event, json.loads(sse.data))
        assert turn.text() == DEMO_TEXT
        headers = {"Last-Event-ID": events[-1].id}
        with httpx_sse.connect_sse(client, "GET", url, headers=headers) as source:
            assert source.response.status_code == 204
            assert list(source.iter_sse()) == []
