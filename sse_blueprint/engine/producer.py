"""A stream's producer on its own greenlet (:class:`ProducerRun`): started once, put to sleep
and woken, stopped, timed out, and the last resort when its end cannot be written.

Imports the context, the life cycle and gevent; the stream only for typing (a run ends its stream
through the stream's public :meth:`~Stream.end`, :meth:`~Stream.stop` and
:meth:`~Stream.adopt_end`, the one way every end goes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import gevent
import gevent.event
from gevent import Greenlet

from .. import _observe
from .context import Producer, ProducerContext
from .lifecycle import ProducerError, StreamClosed, StreamState

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["ProducerRun"]

log = logging.getLogger("sse_blueprint")

#: Seconds a producer's end waits for an end written elsewhere to be adopted (see _adopted).
ADOPTION_WAIT = 1.0


class WakeUp(Exception):
    """Thrown into a producer asleep in :meth:`ProducerRun.sleep` when its stream ends."""


class ProducerRun:
    """``function`` run once for ``stream`` on a greenlet, ended after ``timeout`` seconds.

    ``closed`` is the stream's end signal (set once its terminal event is in its log): a sleeping
    producer wakes on it, and a producer that sends after it gets :class:`StreamClosed`.
    """

    __slots__ = ("_closed", "_greenlet", "_sleeper", "_stream", "_timer", "function", "timeout")

    def __init__(
        self,
        stream: Stream,
        function: Producer,
        timeout: float | None,
        closed: gevent.event.Event,
    ) -> None:
        self._stream = stream
        self.function = function
        self.timeout = timeout
        self._closed = closed
        self._greenlet: Greenlet | None = None
        self._timer: Greenlet | None = None
        # The producer while in ``sleep``: how to wake it (its greenlet's throw).
        self._sleeper: Callable[[type[BaseException]], object] | None = None

    @property
    def started(self) -> bool:
        return self._greenlet is not None

    @property
    def greenlet(self) -> Greenlet | None:
        """The producer's greenlet once started (it may already have finished)."""
        return self._greenlet

    def start(self) -> None:
        if self._greenlet is not None:
            raise RuntimeError("stream already started")
        self._greenlet = gevent.spawn(self._run)
        if self.timeout:
            self._timer = gevent.spawn_later(self.timeout, self._expire)

    def _run(self) -> None:
        stream = self._stream
        name = stream.producer_name
        _observe.current_stream.set(stream.id)
        try:
            result: object = self.function(ProducerContext(stream, stream.input))
        except StreamClosed:
            pass  # cancelled or timed out: the terminal event is already there
        except ProducerError as exc:
            _observe.METRICS.producer_error(name)
            self._end(StreamState.ERROR, {"message": str(exc) or "producer failed"})
        except Exception:
            _observe.METRICS.producer_error(name)
            log.exception(
                "producer %r of stream %s failed", name, stream.id, extra={"stream_id": stream.id}
            )
            self._end(StreamState.ERROR, {"message": "producer failed"})
        else:
            if not isinstance(result, Mapping):
                if result is not None:
                    log.error("producer %r returned %r, not a mapping", name, result)
                result = {}
            self._end(StreamState.DONE, dict(result))
        finally:
            # A producer that returns or dies before its end leaves no stream "running forever".
            if not stream.finished:
                self._end(StreamState.ERROR, {"message": "producer stopped"})
            if not stream.finished and not self._adopted():
                self._end_here("producer stopped")

    def _adopted(self) -> bool:
        """Whether an end refused because the stream ended elsewhere has been adopted, within
        a second (the backend learns that end and takes it: :meth:`Stream.adopt_end`)."""
        try:
            return self._stream.wait(ADOPTION_WAIT)
        except StreamClosed:  # (the adoption stops this greenlet: it has been adopted)
            return True

    def _end(self, state: StreamState, data: Mapping[str, object]) -> None:
        """End the stream; a backend that cannot write the end (away for longer than its
        patience) leaves it running, for the next attempt or :meth:`_end_here`."""
        try:
            self._stream.end(state, data)
        except Exception as exc:
            _observe.stream_log(
                logging.WARNING, self._stream.id, "writing its end failed (%s)", exc
            )

    def _end_here(self, message: str) -> None:
        """The last resort when no end can be written (a backend that keeps failing): end the
        stream in this process anyway (:meth:`Writer.end_locally`)."""
        _observe.stream_log(
            logging.ERROR, self._stream.id, "its end could not be written; ending it here"
        )
        self._stream.writer.end_locally({"message": message})

    def _expire(self) -> None:
        self._timer = None
        self._stream.stop("stream timed out")

    def stop(self) -> None:
        """Stop the producer where it blocks (sleep, I/O); its ``finally`` blocks run."""
        self.fail(StreamClosed(self._stream.id))

    def fail(self, exc: BaseException, *, unless: Collection[object] = ()) -> None:
        """Raise ``exc`` in the producer where it blocks, unless its greenlet is in ``unless``
        (it is waiting for an outcome that raises it anyway)."""
        g = self._greenlet
        # One that has not begun (cancelled at once) is left to begin: its first send or sleep
        # raises StreamClosed, so its own clean-up runs too.
        begun = g is not None and g.gr_frame is not None
        if g is None or not begun or g.dead or g is gevent.getcurrent() or g in unless:
            return
        g.kill(exc, block=False)

    def sleep(self, seconds: float) -> None:
        """See :meth:`ProducerContext.sleep`."""
        closed = self._closed
        if seconds <= 0:
            gevent.sleep(0)
        elif self._sleeper is None:
            # A plain sleep (a quarter of the cost of waiting on the closed event with a
            # timeout, paid on every token); the stream's end wakes it (see ended).
            self._sleeper = gevent.getcurrent().throw
            try:
                if not closed.is_set():
                    gevent.sleep(seconds)
            except WakeUp:
                pass
            finally:
                self._sleeper = None
        else:  # another greenlet of this producer is sleeping already
            closed.wait(seconds)
        if closed.is_set():
            raise StreamClosed(self._stream.id)

    def ended(self) -> None:
        """The stream has ended: wake the producer if it sleeps, and cancel the timeout."""
        if self._sleeper is not None:  # in sleep: wake it on the loop's next turn
            gevent.get_hub().loop.run_callback(self._wake_sleeper)
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None

    def _wake_sleeper(self) -> None:
        # (In the hub.) Still asleep: end that sleep; it raises StreamClosed.
        sleeper = self._sleeper
        if sleeper is not None:
            sleeper(WakeUp)
