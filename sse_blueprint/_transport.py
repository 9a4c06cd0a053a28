"""The transport: how a reader's events become bytes on its client's connection.

Holds the response body generator (catch-up, live events, heartbeats), the direct writes that
send a stream's live events to idle clients' sockets as HTTP/1.1 chunks (gunicorn's gevent
worker; enabled by :mod:`sse_blueprint.gunicorn`), the hand-over of an idle reader's connection
(to :mod:`sse_blueprint._held`), the shutting of a client's connection (a cut), and the sweeper
that cuts clients whose writes stay blocked.
The only bytes made here are HTTP chunk framing; events are encoded by the wire module, once.

Imports the engine and gevent; must not import Flask, the extension or the backends.
"""

from __future__ import annotations

import _socket
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import gevent
import gevent.socket

from . import _observe
from .engine import Event, Subscription

__all__ = [
    "LAST_CHUNK",
    "DirectWriter",
    "WriteWatch",
    "connection_shutter",
    "encode",
    "follow",
    "frame_chunk",
    "shut_connection",
]

log = logging.getLogger("sse_blueprint")


class WriteWatch:
    """Cuts clients whose write stays blocked longer than ``SSE_WRITE_TIMEOUT`` seconds.

    A client that stops reading but keeps its connection open is cut by the lag check while its
    stream runs; once the stream has ended nothing more is appended, so a write that the client
    never takes would hold the connection (and its greenlet) forever. One sweeper per app
    shuts such connections (the subscription's ``on_cut``); a response only stamps
    ``writing_since`` around each write.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.readers: set[Subscription] = set()
        self._sweeper: gevent.Greenlet | None = None

    def add(self, sub: Subscription) -> None:
        self.readers.add(sub)
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def _sweep(self) -> None:
        while True:
            gevent.sleep(min(1.0, self.timeout / 4))
            limit = time.monotonic() - self.timeout
            for sub in list(self.readers):
                if 0 < sub.writing_since < limit and sub.on_cut is not None:
                    self.readers.discard(sub)
                    _observe.METRICS.cut()
                    log.info(
                        "cut a client that took nothing for %.0f s", self.timeout,
                        extra={"stream_id": sub.stream_id},
                    )  # fmt: skip
                    sub.on_cut()


def shut_connection(sock: socket.socket | _socket.socket) -> None:
    """Shut a client's connection through a duplicate of its descriptor.

    A greenlet blocked reading it sees end-of-file, one blocked writing it gets EPIPE: gunicorn
    treats both as a client that went away. (gevent's own ``shutdown`` would cancel a blocked
    write with EBADF, which gunicorn logs as an error.)
    """
    with contextlib.suppress(OSError):
        dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


def connection_shutter(environ: Mapping[str, Any]) -> Callable[[], None] | None:
    """A function that shuts this request's connection (gunicorn exposes its socket), or None."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None
    return lambda: shut_connection(sock)


def encode(events: list[Event], ndjson: bool, preamble: bytes) -> bytes:
    if ndjson:
        return preamble + b"".join([e.ndjson for e in events])
    if len(events) == 1 and not preamble:
        return events[0].sse  # the common case live: one event, bytes shared by every reader
    return preamble + b"".join([e.sse for e in events])


#: Set by :func:`sse_blueprint.gunicorn.post_worker_init` when this process is a gunicorn
#: gevent worker speaking plain HTTP/1.x, the only server whose sockets we write to directly.
direct_writes_possible = False
#: gunicorn's sockets whose connection a held reader took (:meth:`DirectWriter.take_socket`):
#: gunicorn's last write to one fails, which the hook in ``sse_blueprint.gunicorn`` expects.
handed_over: set[Any] = set()


class DirectWriter:
    """Writes live events straight to a client's socket, as HTTP/1.1 chunks, without blocking.

    Under gunicorn's gevent worker, a stream's new events reach all its idle readers from one
    greenlet (see :class:`~sse_blueprint.engine.Subscription`): one non-blocking ``send`` per
    client instead of a greenlet switch and the server's write path. gunicorn frames the body
    in chunks (HTTP/1.1, no Content-Length), sends the headers with the first chunk, and ends
    it with the last; this only adds whole chunks in between. What a full socket did not take
    is the ``backlog``, which the reader's own greenlet writes (blocking) before anything else.
    """

    __slots__ = ("backlog", "failed", "ndjson", "raw", "sock")

    def __init__(self, sock: Any, raw: _socket.socket, ndjson: bool) -> None:
        self.sock: Any = sock  # gevent's socket, blocking writes from the reader's greenlet
        self.raw = raw  # the non-blocking socket under it
        self.ndjson = ndjson
        self.backlog: bytes | memoryview = b""
        self.failed = False

    @classmethod
    def for_request(
        cls, environ: Mapping[str, Any], ndjson: bool, enabled: bool
    ) -> DirectWriter | None:
        """A writer for this response, or None where direct writes would not be safe."""
        if not (enabled and direct_writes_possible):
            return None
        sock: Any = environ.get("gunicorn.socket")
        if (
            type(sock) is not gevent.socket.socket  # not TLS, not some other server's socket
            or environ.get("SERVER_PROTOCOL") != "HTTP/1.1"  # chunked framing, not HTTP/2
            or environ.get("REQUEST_METHOD") != "GET"
        ):
            return None
        # The OS socket under gevent's (whose class is socket.socket once gevent has patched).
        raw = getattr(sock, "_sock", None)
        if not isinstance(raw, _socket.socket) or raw.gettimeout() != 0.0:
            return None
        return cls(sock, raw, ndjson)

    def __call__(self, events: list[Event]) -> bool:
        """Send ``events`` as one chunk; False if the reader's greenlet must take over."""
        data, size = _chunk(events, self.ndjson)
        _observe.METRICS.sent(len(events), size)
        return self.send(data)

    def send(self, data: bytes) -> bool:
        """Send what the socket takes now; False if there is a rest (the ``backlog``) or the
        client has gone (``failed``)."""
        try:
            sent = self.raw.send(data, _MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.failed = True  # the client went away; the reader ends its response
            return False
        if sent < len(data):
            self.backlog = memoryview(data)[sent:]  # no copy of a big chunk
            return False
        return True

    def flush(self, sub: Subscription) -> bool:
        """Write the backlog (blocking this greenlet); False if the client has gone. The write
        is stamped on ``sub`` (``writing_since``) for the write watch while it lasts."""
        if self.failed:
            return False
        backlog, self.backlog = self.backlog, b""
        sub.writing_since = time.monotonic()
        try:
            if self.sock is not None:
                self.sock.sendall(backlog)
            else:  # held (see :mod:`sse_blueprint._held`): the bare socket, gevent's waits
                view = memoryview(backlog)
                while view:
                    try:
                        view = view[self.raw.send(view, _MSG_NOSIGNAL) :]
                    except BlockingIOError:
                        gevent.socket.wait_write(self.raw.fileno())
        except OSError:
            self.failed = True
            return False
        finally:
            sub.writing_since = 0.0
        return True

    def take_socket(self) -> None:
        """Take the connection from the server: gevent's socket (and so gunicorn's) lets go of
        the descriptor, which this writer's bare socket then owns (and closes)."""
        sock = self.sock
        raw = _socket.socket(fileno=sock.detach())  # (if that raises, nothing was taken)
        raw.setblocking(False)
        handed_over.add(sock)
        self.sock, self.raw = None, raw


_MSG_NOSIGNAL: int = getattr(socket, "MSG_NOSIGNAL", 0)
#: The last chunk of an HTTP/1.1 chunked body: the response is complete.
LAST_CHUNK = b"0\r\n\r\n"


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%X\r\n%b\r\n" % (len(data), data)


# The last chunk made, per format: readers at the same position share it.
_last_chunk: dict[bool, tuple[Event, int, bytes, int]] = {}


def _chunk(events: list[Event], ndjson: bool) -> tuple[bytes, int]:
    """``events`` encoded and framed as one HTTP/1.1 chunk, and the size of the payload."""
    last = _last_chunk.get(ndjson)
    if last is not None and last[0] is events[0] and last[1] == len(events):
        return last[2], last[3]
    data = encode(events, ndjson, b"")
    chunk = frame_chunk(data)
    _last_chunk[ndjson] = (events[0], len(events), chunk, len(data))
    return chunk, len(data)


def follow(
    sub: Subscription,
    heartbeat_interval: float,
    preamble: bytes,
    heartbeat: bytes,
    ndjson: bool,
    *,
    watch: WriteWatch,
    counts: dict[str, int],
    address: str,
    direct: DirectWriter | None = None,
    release: Callable[[], None] | None = None,
    first: list[Event] | None = None,
    translate: Callable[[list[Event]], bytes] | None = None,
    cut_notice: bytes = b"",
    hold: Callable[[Subscription, DirectWriter, Callable[[], None]], object | None] | None = None,
) -> Iterator[bytes]:
    """The response body: catch-up, then live events, heartbeats while idle.

    It runs in the WSGI server's greenlet for this connection, outside any request context.
    A client that goes away is noticed at the next write (heartbeats make that timely); the
    server then closes this generator and ``finally`` releases the subscription. The producer
    carries on. The response is counted in ``counts[address]`` while it is open, and across
    workers until ``release`` is called (with Redis). With a ``direct`` writer, live events may
    reach the client without passing through here once the server has sent the headers (after
    the first write). ``first`` is what the subscription already took (its catch-up).
    ``translate`` encodes events in another format (one made per response, such as the AI
    SDK's); such a response gets no direct writes. ``cut_notice`` ends a response whose reader
    was cut or released before the stream's end, for a format whose clients do not reconnect by
    themselves (an EventSource does, from its last id).

    ``hold`` (see :class:`sse_blueprint._held.HeldReaders`) may take the connection over once
    the reader is idle: this body then ends without closing the response, and the reader,
    holding what ``finally`` would release, goes on with no greenlet.
    """
    metrics = _observe.METRICS
    metrics.client_connected()
    counts[address] = counts.get(address, 0) + 1
    leave = partial(_leave, sub, watch, counts, address, release)
    monotonic = time.monotonic
    if translate is not None:
        direct = None
    held = False
    try:
        if first:  # the catch-up, read before the response began
            data = preamble + translate(first) if translate else encode(first, ndjson, preamble)
            metrics.sent(len(first), len(data))
            yield data
            sub.direct = direct
        elif preamble:
            yield preamble
            sub.direct = direct
        while True:
            if (
                hold is not None
                and direct is not None
                and sub.direct is direct
                and sub.lag <= 0
                and not (sub.done or direct.backlog or direct.failed)
            ):
                held = hold(sub, direct, leave) is not None
                if held:
                    return  # the connection is the held reader's now
            events = sub.poll(heartbeat_interval)
            if direct is not None and (direct.backlog or direct.failed):
                # A direct write did not finish: its rest goes first, before ``events``.
                if not direct.flush(sub):
                    return
                if not events:
                    if sub.done:
                        break
                    continue
            if events:
                data = translate(events) if translate else encode(events, ndjson, b"")
            elif sub.done:
                break
            else:
                data = heartbeat
            metrics.sent(len(events), len(data))
            sub.writing_since = monotonic()
            yield data  # the server writes it before asking for more
            sub.writing_since = 0.0
            if sub.done:
                # After the terminal event; or cut for lagging: the client resumes from its id.
                break
            sub.direct = direct  # the headers are out
        if sub.cut and cut_notice:
            yield cut_notice  # ended before the stream did, for a client that does not resume
    finally:
        if not held:
            leave()


def _leave(
    sub: Subscription,
    watch: WriteWatch,
    counts: dict[str, int],
    address: str,
    release: Callable[[], None] | None,
) -> None:
    """A response has ended: its subscription, counts and place across workers go."""
    watch.readers.discard(sub)
    sub.close()
    _observe.METRICS.client_disconnected()
    counts[address] -= 1
    if not counts[address]:
        del counts[address]
    if release is not None:
        release()
