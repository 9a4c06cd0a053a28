"""A gevent SSE load client: N connections, every event read and verified, latency recorded.

Run as its own process (it monkey-patches first)::

    python -m benchmarks.loadclient URL --clients 1000 --expect 500 --out result.json

It connects all clients, prints ``READY`` on stdout, then reads until each client has verified
``--expect`` tick events (their ``n`` must be 0, 1, 2, ... with no gap or repeat) or the
deadline passes. Latency is receipt time minus the producer's
timestamp ``t`` in the event. ``--idle`` only holds the connections until stdin closes.
``--paths FILE`` gives every client its own path (one per line, on the URL's server): many
streams with a few readers each, the chat shape.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from array import array  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from benchmarks.common import raise_fd_limit  # noqa: E402

#: The data line of a tick (servers differ in field order and in "data:" vs "data: ").
TICK = re.compile(rb'data: ?\{"t":([0-9.e+-]+),"n":(\d+)')


class Dechunker:
    """Strips HTTP/1.1 chunked framing, cheaply enough for 100,000 reads a second.

    Every server here writes whole events per chunk and uses LF line ends, and the events are
    JSON (which escapes CR): CR appears only in the framing. Deleting it leaves the events
    intact, with the chunk sizes as stray lines *between* events, which the tick pattern never
    matches. A Python chunk parser made this client, not the servers, the bottleneck.
    """

    __slots__ = ("chunked",)

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked

    def feed(self, data: bytes) -> bytes:
        return data.replace(b"\r", b"") if self.chunked else data


class Reader:
    __slots__ = (
        "errors", "expected", "first_t", "last_recv", "latencies", "pending", "reads", "verified"
    )  # fmt: skip

    def __init__(self) -> None:
        self.expected = 0
        self.verified = 0
        self.errors: list[str] = []
        self.latencies = array("d")
        self.pending = b""
        self.reads = 0
        self.first_t = float("inf")  # producer timestamp of the first event
        self.last_recv = 0.0  # receipt time of the last event


class Conn:
    """One client connection: its socket, the response head once it has come, the dechunker."""

    __slots__ = ("dechunk", "early", "head", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""  # bytes of the response head until it is complete
        self.dechunk: Dechunker | None = None
        self.early = b""  # body bytes that came with the head

    def take_head(self, data: bytes) -> bool:
        """Feed bytes until the head is complete; True once it is (raises on a non-200)."""
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return False
        head, _, body = self.head.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise ConnectionError(f"HTTP {status}")
        self.dechunk = Dechunker(b"transfer-encoding: chunked" in head.lower())
        self.early = self.dechunk.feed(body)
        return True


def open_stream(host: str, port: int, path: str, head_wait: float) -> Conn:
    """Connect and send the request; wait up to ``head_wait`` s for the response head (some
    servers send nothing, not even headers, before their first event)."""
    sock = socket.create_connection((host, port), timeout=60)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    sock.sendall(request.encode())
    conn = Conn(sock)
    deadline = time.monotonic() + head_wait
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            raise ConnectionError("closed before the headers")
        if conn.take_head(chunk):
            break
    return conn


def _recv(sock: socket.socket) -> bytes:
    """The next bytes, or b"" once the connection is gone.

    No timeout per read (gevent would start and stop a timer for each): the whole run has one
    deadline, at which :func:`main` kills the readers.
    """
    try:
        return sock.recv(262144)
    except OSError:
        return b""


def read(conn: Conn, reader: Reader, expect: int) -> None:
    sock = conn.sock
    sock.settimeout(None)
    now = time.time()
    while conn.dechunk is None:  # the head has not come yet
        raw = _recv(sock)
        if not raw:
            return
        if conn.take_head(raw):
            now = time.time()
            break
    dechunk, data = conn.dechunk, conn.early
    assert dechunk is not None  # the loop above ends only once the head has come
    lat = reader.latencies
    while True:
        text = reader.pending + data
        cut = text.rfind(b"\n\n")
        if cut >= 0:
            reader.pending = text[cut + 2 :]
            before = reader.verified
            for m in TICK.finditer(text, 0, cut + 2):
                n = int(m[2])
                if n != reader.expected:
                    reader.errors.append(f"got n={n}, expected n={reader.expected}")
                    reader.expected = n
                reader.expected += 1
                reader.verified += 1
                sent = float(m[1])
                lat.append(now - sent)
                if sent < reader.first_t:
                    reader.first_t = sent
            if reader.verified > before:
                reader.last_recv = now
        else:
            reader.pending = text
        if reader.verified >= expect:
            return
        raw = _recv(sock)
        if not raw:
            return
        reader.reads += 1
        now = time.time()
        data = dechunk.feed(raw)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--connect-rate", type=float, default=2000, help="connections per second")
    parser.add_argument("--head-wait", type=float, default=3.0)
    parser.add_argument("--out")
    parser.add_argument("--paths", help="a file with one path per client")
    args = parser.parse_args(argv)
    raise_fd_limit()
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path + (f"?{url.query}" if url.query else "")
    paths = [path] * args.clients
    if args.paths:
        with open(args.paths) as f:
            paths = [line.strip() for line in f if line.strip()]
        args.clients = len(paths)

    conns: list[Any] = [None] * args.clients
    failures: list[str] = []

    def connect(i: int) -> None:
        for attempt in range(5):
            try:
                conns[i] = open_stream(host, port, paths[i], args.head_wait)
                return
            except OSError as exc:
                if attempt == 4:
                    failures.append(str(exc))
                gevent.sleep(0.2 * (attempt + 1))

    began = time.monotonic()
    group = gevent.pool.Pool(500)
    for i in range(args.clients):
        group.spawn(connect, i)
        if args.connect_rate and i % 50 == 49:
            gevent.sleep(50 / args.connect_rate)
    group.join()
    connected = sum(c is not None for c in conns)
    served = sum(c is not None and c.dechunk is not None for c in conns)  # the head came
    connect_seconds = time.monotonic() - began
    print(f"READY {served if args.idle else connected}", flush=True)

    if args.idle:
        sys.stdin.read()  # hold the connections until the harness is done measuring
        result: dict[str, Any] = {"connected": served, "failures": failures[:5]}
    else:
        cpu0, wall0 = time.process_time(), time.monotonic()
        readers = [Reader() for _ in conns]
        jobs = [
            gevent.spawn(read, c, r, args.expect)
            for c, r in zip(conns, readers, strict=True)
            if c is not None
        ]
        gevent.joinall(jobs, timeout=args.timeout)
        gevent.killall(jobs)  # the deadline: whatever is unverified by now counts as lost
        # How busy this client was while reading: near 1.0, its own queueing is in the latency.
        client_cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        lat = sorted(x for r in readers for x in r.latencies)
        verified = sum(r.verified for r in readers)
        first = min((r.first_t for r in readers), default=0.0)
        last = max((r.last_recv for r in readers), default=0.0)
        seconds = last - first if verified else float("nan")
        result = {
            "connected": connected,
            "connect_seconds": connect_seconds,
            "failures": failures[:5],
            "expected": args.expect * args.clients,
            "verified": verified,
            "reads": sum(r.reads for r in readers),
            "client_cpu": client_cpu,
            "errors": sum(len(r.errors) for r in readers),
            "error_samples": [e for r in readers for e in r.errors][:5],
            "p50_ms": percentile(lat, 0.50) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "max_ms": (lat[-1] * 1000) if lat else float("nan"),
            "seconds": seconds,
            "deliveries_per_s": verified / seconds if verified and seconds > 0 else 0.0,
        }
    for c in conns:
        if c is not None:
            c.sock.close()
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
