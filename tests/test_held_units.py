"""Held readers in one process: a stream, a held reader on one end of a socket pair, the test's
client on the other (no server). See ``test_held.py`` for the same on gunicorn."""

from __future__ import annotations

import socket
from typing import Any

import gevent
import gevent.socket

from sse_blueprint import ProducerContext, Stream, _wire
from sse_blueprint._held import HeldReaders
from sse_blueprint._transport import DirectWriter
from tests.helpers.http1 import read_chunked
from tests.helpers.sse_parser import SSEParser


def held(stream: Stream, readers: HeldReaders) -> tuple[socket.socket, list[int]]:
    """A reader of ``stream`` from its start, held on one end of a socket pair (as the
    response body hands it over once its headers are out); the other end, and how many times
    its response's end released it."""
    ours, theirs = gevent.socket.socketpair()
    sub = stream.subscribe(0)
    direct = DirectWriter(ours, ours._sock, ndjson=False)  # the OS socket under gevent's
    sub.direct = direct
    left: list[int] = []

    def leave() -> None:  # as the response's end does: the subscription goes
        left.append(1)
        sub.close()

    assert readers.take_over(sub, direct, leave) is not None
    return theirs, left


def read_to_end(sock: Any) -> tuple[bytes, bool]:
    """The dechunked body up to the last chunk, and whether the peer then closed."""
    with gevent.Timeout(20):
        _, body = read_chunked(sock, head=False)
        closed = sock.recv(1) == b""
    return body, closed


def test_a_held_reader_gets_every_event_heartbeats_and_the_end() -> None:
    def producer(ctx: ProducerContext) -> None:
        for i in range(50):
            ctx.send("tick", {"n": i})
            ctx.sleep(0.2 if i == 25 else 0.002)  # one pause: heartbeats meanwhile

    readers = HeldReaders(0.05, _wire.HEARTBEAT, _wire.NDJSON_KEEPALIVE)
    stream = Stream(producer)
    socks = [held(stream, readers) for _ in range(30)]  # more than the fan-out writes inline
    assert len(readers) == 30
    stream.start()
    for sock, left in socks:
        body, closed = read_to_end(sock)
        events = SSEParser().feed(body, final=True)
        assert [e.id for e in events] == list(range(1, 53))  # start, 50 ticks, done
        assert [e.json()["n"] for e in events if e.type == "tick"] == list(range(50))
        assert events[-1].type == "done"
        assert b": heartbeat" in body
        assert closed
        gevent.sleep(0)
        assert left == [1]
    assert len(readers) == 0
    assert stream.subscriber_count == 0


def test_a_held_reader_that_stops_reading_is_cut_and_released() -> None:
    blob = "x" * 100_000

    def producer(ctx: ProducerContext) -> None:
        for i in range(200):  # 20 MB: more than the socket pair buffers
            ctx.send("blob", {"n": i, "data": blob})
            ctx.sleep(0.001)

    readers = HeldReaders(0.05, _wire.HEARTBEAT, _wire.NDJSON_KEEPALIVE)
    stream = Stream(producer, client_queue=16)
    sock, left = held(stream, readers)
    stream.start()
    with gevent.Timeout(20):
        while left != [1]:  # never read: a partial write, a greenlet's flush, a lag cut
            gevent.sleep(0.01)
    assert len(readers) == 0
    assert stream.subscriber_count == 0
    received = 0
    with gevent.Timeout(20):
        while chunk := sock.recv(1 << 20):  # what was sent, then the shut connection's end
            received += len(chunk)
    assert 0 < received < 200 * 100_000
    stream.stop()
