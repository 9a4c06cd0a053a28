"""The ceiling: a bare gevent server writing the same bytes, one sendall per event per socket."""

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


def publish(count: int, pad: str, interval: float) -> None:
    began = time.monotonic()
    for n in range(count):
        data = f"id: {n + 1}\nevent: tick\ndata: {dumps(tick(n, pad))}\n\n".encode()
        for sock in list(clients):
            try:
                sock.sendall(data)  # type: ignore[attr-defined]
            except OSError:
                clients.discard(sock)
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
    # The same socket options as the other servers: gunicorn and asyncio (uvicorn) both set
    # TCP_NODELAY, so every write goes out at once instead of waiting to be coalesced.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    sock.sendall(HEAD)  # type: ignore[attr-defined]
    clients.add(sock)
    try:
        while sock.recv(4096):  # type: ignore[attr-defined]
            pass
    finally:
        clients.discard(sock)


if __name__ == "__main__":
    raise_fd_limit()
    StreamServer(("127.0.0.1", int(sys.argv[1])), handle, backlog=4096).serve_forever()
