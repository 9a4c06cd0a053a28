"""Held readers (:class:`HeldReaders`): idle clients kept by the worker with no greenlet each.

A reader with nothing to send spends its time waiting. Under gunicorn's gevent worker that wait
is a whole request in memory: the connection's greenlet and its saved stack, gunicorn's request,
parser and environ, Flask's response and the body's generator, about 16 KB per idle client.
Once its response has begun and it is idle, a reader that writes directly to its socket (see
:class:`~sse_blueprint._transport.DirectWriter`) is *held* instead: it takes the connection from
gunicorn (whose greenlet then ends), is parked on its stream's fan-out with no greenlet
waiting, and gets one only while a write needs to wait (a full socket, the response's end).
What stays per client is the subscription, the writer and its socket: about 1 KB. One greenlet
per app sends heartbeats to all held readers.

A held connection ends as a response that gunicorn ends would (the last chunk), and is then
closed: gunicorn no longer reads it for another request.

Imports the transport and the engine's subscription, and gevent; not Flask or gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import gevent

from . import _observe
from ._transport import LAST_CHUNK, DirectWriter, frame_chunk, shut_connection
from .engine import Subscription

__all__ = ["HeldReader", "HeldReaders"]

log = logging.getLogger("sse_blueprint")

#: Seconds a heartbeat round runs before it lets other greenlets run.
BEAT_SLICE = 0.02


class HeldReader:
    """One held client: its subscription, its writer, and what ends it (see module docstring).

    It is the subscription's ``wakeup``: the fan-out calls :meth:`set` when a write cannot wait
    (a partial or failed one, the end, a cut), which runs :meth:`_serve` on a greenlet of its
    own until the reader is idle again or its response ends.
    """

    __slots__ = ("_busy", "direct", "heartbeat", "leave", "owner", "sub")

    def __init__(
        self,
        owner: HeldReaders,
        sub: Subscription,
        direct: DirectWriter,
        heartbeat: bytes,
        leave: Callable[[], None],
    ) -> None:
        self.owner = owner
        self.sub = sub
        self.direct = direct
        self.heartbeat = heartbeat  # framed as a chunk
        self.leave = leave  # releases what the response held (subscription, counts, place)
        self._busy = False  # a greenlet serves it

    @property
    def held(self) -> bool:
        """Parked with no greenlet: only the fan-out and the heartbeats write to it."""
        return self.sub.waiting and not self._busy

    def set(self) -> None:
        """The fan-out's wake-up: serve this reader from a greenlet of its own."""
        if not self._busy:
            self._busy = True
            gevent.spawn_raw(self._serve)

    def shut(self) -> None:
        """Shut the connection (a cut reader blocked in a write, a write that never ends): a
        write under way then fails at once."""
        shut_connection(self.direct.raw)

    def _serve(self) -> None:
        # Waiting until now, as a parked reader is until its greenlet runs: a cut before this
        # only marks it (it ends its response below) instead of shutting the connection.
        self.sub.waiting = False
        ended = True
        try:
            ended = self._write()
        except Exception:
            _observe.stream_log(
                logging.ERROR, self.sub.stream_id, "a held reader's write failed", exc_info=True
            )
        finally:
            self._busy = False
            if ended:
                self._end()

    def _write(self) -> bool:
        """Write what is pending; hold the reader again once idle. True if the response ended."""
        sub, direct = self.sub, self.direct
        while True:
            if (direct.backlog or direct.failed) and not direct.flush(sub):
                return True  # the client has gone
            if sub.cut or sub.closed:
                break
            events = sub.take()
            if events:
                direct(events)  # what the socket does not take now is flushed above
                continue
            if sub.done:
                break
            sub.hold()  # idle again (nothing blocked since ``take``)
            return False
        if not direct.send(LAST_CHUNK):
            direct.flush(sub)
        return True

    def _end(self) -> None:
        self.owner.readers.discard(self)
        try:
            self.leave()
        finally:
            with contextlib.suppress(OSError):
                self.direct.raw.close()


class HeldReaders:
    """The held readers of one app, and the greenlet that sends them heartbeats."""

    def __init__(
        self, heartbeat_interval: float, heartbeat: bytes, ndjson_heartbeat: bytes
    ) -> None:
        self.interval = heartbeat_interval
        # Each format's heartbeat, framed as a chunk (shared by every reader of that format).
        self.heartbeats = {False: frame_chunk(heartbeat), True: frame_chunk(ndjson_heartbeat)}
        self.readers: set[HeldReader] = set()
        self._beats: gevent.Greenlet | None = None

    def take_over(
        self, sub: Subscription, direct: DirectWriter, leave: Callable[[], None]
    ) -> HeldReader | None:
        """Take an idle reader's connection from the server (see :func:`~._transport.follow`).

        Never blocks: nothing can reach the client between the caller's checks and the park.
        """
        try:
            direct.take_socket()
        except OSError:
            return None
        reader = HeldReader(self, sub, direct, self.heartbeats[direct.ndjson], leave)
        sub.on_cut = reader.shut
        sub.wakeup = reader
        self.readers.add(reader)
        sub.hold()
        if self._beats is None:
            self._beats = gevent.spawn(self._beat)
        return reader

    def _beat(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                self._beat_once()
            except Exception:  # a round's failure must not end the heartbeats of every reader
                log.exception("sending heartbeats to held readers failed")

    def _beat_once(self) -> None:
        clock = time.perf_counter
        began = clock()
        for i, reader in enumerate(list(self.readers)):
            if i & 63 == 63 and clock() - began > BEAT_SLICE:
                gevent.sleep(0)
                began = clock()
            if not reader.held:
                continue
            sub = reader.sub
            if sub.done:
                sub.wake()  # ended while nothing woke it
            elif reader.direct.send(reader.heartbeat):
                _observe.METRICS.sent(0, len(reader.heartbeat))
            else:
                sub.wake()  # a partial write, or gone

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every held reader to end; whether they did."""
        deadline = time.monotonic() + timeout
        while self.readers and time.monotonic() < deadline:
            gevent.sleep(0.05)
        return not self.readers

    def __len__(self) -> int:
        return len(self.readers)
