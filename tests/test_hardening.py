"""Hostile and broken requests against a real gunicorn: each costs at most a 4xx, never a worker.

Found by an outside probe: slow request bodies that held connections for good, request bodies
that made 500s (deep JSON, bad chunked framing), a POST any site could send as the user,
one address filling every stream slot, and HTML or redirect answers under the blueprint.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Any

import httpx
import pytest

from tests.conftest import LIVE_APP, LiveServer, read_stream, start_demo

SLOW_CONNECTIONS = 2000
BODY_TIMEOUT = 10.0  # the default


def raw_request(server: LiveServer, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is and read until the server closes the connection."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_slow_request_bodies_get_408_and_leave_the_worker_serving(server_factory: Any) -> None:
    """2,000 clients that send a POST's headers, then its body one byte at a time: each gets a
    408 once SSE_BODY_TIMEOUT (10 s by default) has passed and its connection is closed; other
    clients are served while they hang on."""
    server = server_factory({}, app=LIVE_APP)
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        b"POST /api/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    selector = selectors.DefaultSelector()
    answers: dict[socket.socket, bytes] = {}
    closed: set[socket.socket] = set()
    began = time.monotonic()
    for _ in range(SLOW_CONNECTIONS):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(head)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        answers[sock] = b""
    opened = time.monotonic()
    for _ in range(5):  # while all of them hold their connection
        stream_id = start_demo(server.url, "Served meanwhile.", interval_ms=0)
        assert read_stream(server.url, stream_id).transcript.terminal == "done"
    answered_early = {k.fileobj for k, _ in selector.select(timeout=0)}
    assert len(answered_early) < SLOW_CONNECTIONS  # they were still waiting meanwhile
    next_byte = opened
    deadline = opened + BODY_TIMEOUT + 40
    try:
        while len(closed) < SLOW_CONNECTIONS and time.monotonic() < deadline:
            if time.monotonic() >= next_byte:  # one more byte from every slow client
                next_byte = time.monotonic() + 0.5
                for sock in answers:
                    if sock not in closed:
                        with contextlib.suppress(OSError):
                            sock.send(b" ")
            for key, _ in selector.select(timeout=0.1):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    chunk = ready.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                answers[ready] += chunk
                if not chunk:
                    closed.add(ready)
                    selector.unregister(ready)
        took = time.monotonic() - began
    finally:
        for sock in answers:
            sock.close()
        selector.close()
    assert len(closed) == SLOW_CONNECTIONS, f"{SLOW_CONNECTIONS - len(closed)} still open"
    statuses = {answer.split(b"\r\n", 1)[0] for answer in answers.values()}
    assert {s[:12] for s in statuses} == {b"HTTP/1.1 408"}
    assert all(b'{"error": "the request body did not arrive' in a for a in answers.values())
    assert took >= BODY_TIMEOUT  # none was cut before its time


def test_deeply_nested_json_is_400(server: LiveServer) -> None:
    depth = 100_000
    body = '{"producer": "demo", "input": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    response = httpx.post(
        f"{server.url}/api/streams", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"error": "request body must be a JSON object"}


@pytest.mark.parametrize(
    "body",
    [b"ZZ\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n"],
    ids=["bad-size", "no-terminator", "negative-size"],
)
def test_malformed_chunked_body_is_400(server: LiveServer, body: bytes) -> None:
    answer = raw_request(
        server,
        b"POST /api/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b'{"error": "malformed request body"}' in answer


CROSS_SITE_BODIES = [
    ("text/plain", '{"producer": "demo", "input": {"text": "forged"}}'),
    ("application/x-www-form-urlencoded", "producer=demo"),
    ("multipart/form-data; boundary=x", '--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n'),
    ("application/xml", "<producer>demo</producer>"),
    (None, '{"producer": "demo", "input": {"text": "forged"}}'),
]


@pytest.mark.parametrize(("content_type", "body"), CROSS_SITE_BODIES)
def test_posts_that_are_not_json_are_415(
    server: LiveServer, content_type: str | None, body: str
) -> None:
    """What a form or a no-cors fetch on another site can send (with the user's cookies)."""
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/api/streams", f"/api/streams/{start_demo(server.url)}/cancel"):
        response = httpx.post(server.url + path, content=body, headers=headers)
        assert response.status_code == 415, (path, response.text)
        assert response.json() == {"error": "Content-Type must be application/json"}


def test_cross_site_posts_are_refused_unless_the_origin_is_allowed(server_factory: Any) -> None:
    server = server_factory({"SSE_CORS_ORIGINS": "https://app.example"}, app=LIVE_APP)
    url = f"{server.url}/api/streams"
    body = {"producer": "demo", "input": {"text": "hi"}}

    def post(site: str, origin: str) -> httpx.Response:
        return httpx.post(url, json=body, headers={"Sec-Fetch-Site": site, "Origin": origin})

    refused = post("cross-site", "https://evil.example")
    assert refused.status_code == 403
    assert "cross-site" in refused.json()["error"]
    assert post("cross-site", "https://app.example").status_code == 201  # allowed by CORS
    assert post("same-origin", server.url).status_code == 201
    stream_id = post("same-origin", server.url).json()["stream_id"]
    cancel = httpx.post(
        f"{url}/{stream_id}/cancel",
        json={},
        headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    )
    assert cancel.status_code == 403


def test_one_address_cannot_fill_every_stream_slot(server_factory: Any) -> None:
    server = server_factory({"SSE_MAX_STREAMS_PER_ADDRESS": 3}, app=LIVE_APP)
    long = "x" * 400
    running = [start_demo(server.url, long, chunk_size=1, interval_ms=50) for _ in range(3)]
    refused = httpx.post(
        f"{server.url}/api/streams", json={"producer": "demo", "input": {"text": long}}
    )
    assert refused.status_code == 429
    assert refused.headers["retry-after"]
    assert "running streams" in refused.json()["error"]
    cancel = httpx.post(f"{server.url}/api/streams/{running[0]}/cancel", json={})
    assert cancel.status_code == 202
    again = start_demo(server.url, long, chunk_size=1, interval_ms=50)  # a place is free again
    for stream_id in [*running[1:], again]:
        httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("TRACE", "/api/streams"),
        ("CONNECT", "/api/streams/x"),
        ("PROPFIND", "/api/streams/x/status"),
        ("GET", "/api//streams/x/status"),
        ("GET", "/api/streams/x//status"),
        ("GET", "/api/streams//x"),
    ],
)
def test_every_answer_under_the_blueprint_is_json(
    server: LiveServer, method: str, path: str
) -> None:
    response = httpx.request(method, server.url + path)
    assert response.status_code in (404, 405), response.status_code
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()
    if response.status_code == 405:
        assert response.headers["allow"] in ("GET", "POST")


def test_pages_outside_the_blueprint_keep_their_own_errors(server: LiveServer) -> None:
    response = httpx.request("TRACE", server.url + "/")
    assert response.status_code == 405
    assert "application/json" not in response.headers["content-type"]
