"""The ceiling: a bare gevent server writing the same bytes, one sendall per event per socket
(one stream to many clients at ``/stream``; the chat shape at ``/chat/<k>``)."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from benchmarks.common import dumps, pause, raise_fd_limit, tick  # noqa: E402

clients: set[object] = set()
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\nretry: 2000\n\n"
)


def send_to(readers: set[object], event: bytes) -> None:
    """One sendall per reader; a reader that has gone is dropped."""
    for sock in list(readers):
        try:
            sock.sendall(event)  # type: ignore[attr-defined]
        except OSError:
            readers.discard(sock)


def publish(count: int, pad: str, interval: float) -> None:
    began = time.monotonic()
    for n in range(count):
        send_to(clients, f"id: {n + 1}\nevent: tick\ndata: {dumps(tick(n, pad))}\n\n".encode())
        gevent.sleep(pause(began, n, interval))


#: The chat shape: one producer per channel, its own readers (one set per channel).
channels: dict[str, set[object]] = {}


def chat(channel: str, tokens: int, rate: float) -> None:
    """One stream of the chat shape: ``tokens`` text deltas at ``rate`` per second."""
    readers = channels.setdefault(channel, set())
    began, interval = time.monotonic(), 1 / rate
    for n in range(tokens):
        data = {"t": time.time(), "n": n, "block": n // 80, "text": "tok "}
        send_to(readers, f"id: {n + 1}\nevent: text_delta\ndata: {dumps(data)}\n\n".encode())
        gevent.sleep(pause(began, n, interval))


def handle(sock: object, address: object) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = sock.recv(4096)  # type: ignore[attr-defined]
        if not chunk:
            return
        request += chunk
    target = urlsplit(request.split(b" ", 2)[1].decode())
    if target.path == "/publish":
        q = parse_qs(target.query)
        count, pad = int(q["count"][0]), "x" * int(q.get("pad", ["0"])[0])
        gevent.spawn(publish, count, pad, float(q.get("interval_ms", ["0"])[0]) / 1000)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")  # type: ignore[attr-defined]
        return
    if target.path == "/publish_chat":
        q = parse_qs(target.query)
        tokens, rate = int(q["tokens"][0]), float(q["rate"][0])
        for k in range(int(q["streams"][0])):
            gevent.spawn(chat, str(k), tokens, rate)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")  # type: ignore[attr-defined]
        return
    # The same socket options as the other servers: gunicorn and asyncio (uvicorn) both set
    # TCP_NODELAY, so every write goes out at once instead of waiting to be coalesced.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    sock.sendall(HEAD)  # type: ignore[attr-defined]
    readers = clients
    if target.path.startswith("/chat/"):
        readers = channels.setdefault(target.path.removeprefix("/chat/"), set())
    readers.add(sock)
    try:
        while sock.recv(4096):  # type: ignore[attr-defined]
            pass
    finally:
        readers.discard(sock)


if __name__ == "__main__":
    raise_fd_limit()
    StreamServer(("127.0.0.1", int(sys.argv[1])), handle, backlog=4096).serve_forever()
