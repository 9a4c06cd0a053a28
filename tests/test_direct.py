"""Direct writes: a stream's new events reach its idle readers from one greenlet.

The engine part runs here on its own (the ``direct`` callable stands in for the socket write);
the web part runs against gunicorn, whose gevent worker is the server that enables it.
"""

from __future__ import annotations

import itertools
import random
import socket
import time
from typing import Any

import gevent
import httpx
import pytest

from sse_blueprint import ProducerContext, Stream
from sse_blueprint.engine import Event, Subscription
from tests.conftest import LIVE_APP, LiveServer, start_stream, wait_done
from tests.helpers.http1 import open_stream, read_response
from tests.helpers.sse_parser import SSEParser, Transcript


def paced(n: int, seed: int) -> Any:
    """``n`` ticks, sometimes several at once, sometimes after a pause."""

    def producer(ctx: ProducerContext) -> None:
        rng = random.Random(seed)
        for i in range(n):
            ctx.send("tick", {"n": i})
            if rng.random() < 0.5:
                ctx.sleep(rng.choice([0, 0.001, 0.003]))

    return producer


class Recorder:
    """A ``direct`` writer that takes everything, or refuses (``False``) on chosen calls."""

    def __init__(self, refuse: set[int] | None = None, fail_on: int | None = None) -> None:
        self.events: list[Event] = []
        self.calls = 0
        self.refuse = refuse or set()
        self.fail_on = fail_on

    def __call__(self, events: list[Event]) -> bool:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("deliberate test failure in a direct write")
        self.events += events  # a refused write still took them: its rest is a backlog
        return self.calls not in self.refuse


def read_direct(sub: Subscription, recorder: Recorder) -> tuple[list[Event], list[Event], int]:
    """Follow ``sub`` as the web layer does; return (all events in order, polled ones, wakes)."""
    sub.direct = recorder
    got: list[Event] = []
    polled: list[Event] = []
    wakes = 0
    with gevent.Timeout(10):
        while not sub.done:
            before = len(recorder.events)
            events = sub.poll(30)
            wakes += 1
            got += recorder.events[before:]  # what went out directly while it was parked
            got += events
            polled += events
    return got, polled, wakes


@pytest.mark.parametrize("seed", range(5))
def test_parked_readers_get_every_event_in_order_without_waking(seed: int) -> None:
    stream = Stream(paced(500, seed))
    recorders = [Recorder() for _ in range(20)]
    subs = [stream.subscribe(0) for _ in recorders]
    readers = [gevent.spawn(read_direct, s, r) for s, r in zip(subs, recorders, strict=True)]
    stream.start()
    gevent.joinall(readers, raise_error=True)
    expected = stream.buffered_after(0)
    assert [e.id for e in expected] == list(range(1, 503))
    for reader, recorder in zip(readers, recorders, strict=True):
        got, _polled, wakes = reader.value
        assert [e.id for e in got] == [e.id for e in expected]
        assert wakes <= 3  # the start, maybe a race with the first events, and the end
        assert recorder.calls > 10  # many rounds, one write each


def test_a_refused_write_wakes_the_reader_which_goes_on_in_order() -> None:
    stream = Stream(paced(400, 1))
    recorder = Recorder(refuse={3, 7, 8, 20})
    sub = stream.subscribe(0)
    reader = gevent.spawn(read_direct, sub, recorder)
    stream.start()
    got, polled, wakes = reader.get(timeout=10)
    assert [e.id for e in got] == list(range(1, 403))
    assert wakes >= 5  # each refusal woke it; its greenlet then carried on
    assert polled  # and it took some events itself before it parked again


def test_a_failing_direct_write_cuts_only_that_reader() -> None:
    stream = Stream(paced(300, 2))
    bad, good = Recorder(fail_on=5), Recorder()
    bad_sub, good_sub = stream.subscribe(0), stream.subscribe(0)
    readers = [gevent.spawn(read_direct, bad_sub, bad), gevent.spawn(read_direct, good_sub, good)]
    stream.start()
    gevent.joinall(readers, raise_error=True)
    assert bad_sub.cut  # it resumes from its last id elsewhere
    assert [e.id for e in readers[1].value[0]] == list(range(1, 303))


def test_parked_readers_are_released_at_once() -> None:
    stream = Stream(lambda ctx: ctx.sleep(60))
    subs = [stream.subscribe(0) for _ in range(10)]
    readers = [gevent.spawn(read_direct, s, Recorder()) for s in subs]
    stream.start()
    gevent.sleep(0.05)
    assert len(stream.readers.fan_out.parked) == 10
    began = time.monotonic()
    assert stream.release_readers() == 10
    gevent.joinall(readers, timeout=5, raise_error=True)
    assert time.monotonic() - began < 1
    assert not stream.readers.fan_out.parked
    stream.cancel()


def test_direct_and_ordinary_readers_share_a_stream() -> None:
    stream = Stream(paced(300, 3))
    plain = stream.subscribe(0)
    direct = stream.subscribe(0)
    got_plain: list[Event] = []

    def read_plain() -> None:
        with gevent.Timeout(10):
            while not plain.done:
                got_plain.extend(plain.poll(30))

    readers = [gevent.spawn(read_plain), gevent.spawn(read_direct, direct, Recorder())]
    stream.start()
    gevent.joinall(readers, raise_error=True)
    assert [e.id for e in got_plain] == list(range(1, 303))
    assert [e.id for e in readers[1].value[0]] == list(range(1, 303))


def test_a_long_fan_out_lets_the_rest_of_the_worker_run() -> None:
    """300 parked readers whose writes take 0.5 ms each: a 150 ms round, paused every ~20 ms.
    Counted in writes, not in seconds, so that a busy machine cannot fail it: a pause comes
    sooner, never later, when the process is scheduled out."""
    ticks = 0
    seen: list[int] = []  # the ticker's count at each write

    class Slow(Recorder):
        def __call__(self, events: list[Event]) -> bool:
            seen.append(ticks)
            until = time.perf_counter() + 0.0005
            while time.perf_counter() < until:
                pass  # a big chunk being copied into the socket buffer
            return super().__call__(events)

    def three(ctx: ProducerContext) -> None:
        for i in range(3):
            ctx.send("tick", {"n": i})

    stream = Stream(three)
    subs = [stream.subscribe(0) for _ in range(300)]
    readers = [gevent.spawn(read_direct, s, Slow()) for s in subs]
    gevent.sleep(0.01)  # all parked

    def ticker() -> None:
        nonlocal ticks
        while True:
            gevent.sleep(0)
            ticks += 1

    tick = gevent.spawn(ticker)
    stream.start()
    gevent.joinall(readers, timeout=10, raise_error=True)
    tick.kill()
    for reader in readers:
        assert [e.id for e in reader.value[0]] == [1, 2, 3, 4, 5]
    # The most writes in a row with no other greenlet run between them: about 40 (20 ms of
    # 0.5 ms writes); without the pauses, a whole round of 300.
    longest = max(len(list(run)) for _, run in itertools.groupby(seen))
    assert longest <= 100, longest


# -- over HTTP, on gunicorn -----------------------------------------------------------------------


def _parked_while_reading(server: LiveServer) -> int:
    """How many readers are parked while one client follows an idle stream."""
    stream_id = start_stream(server.url, "stall")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /api/streams/{stream_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"waiting" not in data:  # the catch-up went out through the server
            data += sock.recv(65536)
        time.sleep(0.05)
        found: int = httpx.get(f"{server.url}/test/resources", timeout=10).json()["parked"]
    wait_done(server.url, stream_id)
    return found


def test_gunicorn_readers_park_unless_direct_writes_are_off(server_factory: Any) -> None:
    on: LiveServer = server_factory({}, app=LIVE_APP)
    off: LiveServer = server_factory({"SSE_DIRECT_WRITES": False}, app=LIVE_APP)
    assert _parked_while_reading(on) == 1
    assert _parked_while_reading(off) == 0


def test_a_reader_behind_a_full_socket_gets_every_byte_through_partial_writes(
    server_factory: Any,
) -> None:
    """20 MB to a client that pauses: more than the kernel buffers (``tcp_wmem`` grows a send
    buffer to 4 MB), so direct writes go out in part and its greenlet writes the rest."""
    server: LiveServer = server_factory({"SSE_CLIENT_QUEUE": 4096}, app=LIVE_APP)
    size, count = 100_000, 200
    stream_id = start_stream(server.url, "flood", count=count, size=size, interval_ms=5)
    with open_stream(server.url, f"/api/streams/{stream_id}", rcvbuf=8192) as sock:
        time.sleep(1.0)  # the producer runs ahead; the buffers fill; writes go out in parts
        head, payload, _ = read_response(sock)  # the chunked framing undone by the rules
    assert b"transfer-encoding: chunked" in head.lower()
    events = SSEParser().feed(payload, final=True)
    transcript = Transcript()
    for event in events:
        transcript.apply(event.id, event.type, event.json())
    assert [e.id for e in events] == list(range(1, count + 3))  # every id, in order, once
    assert events[-1].type == "done"
    assert transcript.text() == "".join(chr(ord("a") + i % 26) * size for i in range(count))


@pytest.mark.parametrize(
    ("worker_class", "protocol", "http_protocols", "possible"),
    [
        ("gevent", "http", ["h1"], True),
        ("gevent", "uwsgi", ["h1"], False),  # nginx's uwsgi_pass: no HTTP chunks on the wire
        ("gevent", "http", ["h2", "h1"], False),  # HTTP/2 shares the connection
        ("sync", "http", ["h1"], False),
    ],
)
def test_direct_writes_only_where_gunicorn_frames_http_1_1_on_gevent_sockets(
    worker_class: str, protocol: str, http_protocols: list[str], possible: bool
) -> None:
    from types import SimpleNamespace

    from gunicorn.workers.ggevent import GeventWorker
    from gunicorn.workers.sync import SyncWorker

    from sse_blueprint.gunicorn import _speaks_plain_http

    cls = GeventWorker if worker_class == "gevent" else SyncWorker
    worker = cls.__new__(cls)
    worker.cfg = SimpleNamespace(protocol=protocol, http_protocols=http_protocols)
    assert _speaks_plain_http(worker) is possible
