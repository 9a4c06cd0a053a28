"""Group commit: many greenlets' writes, one round trip.

A :class:`Batcher` takes work items from any number of greenlets, each of which waits for its
own item's outcome (:meth:`Batcher.submit`) or is called back with it (:meth:`Batcher.enqueue`),
and hands whatever is waiting to one writer greenlet at a time, as one batch. While a batch is
being written, the next one gathers. On a busy worker, where every round trip waits a turn of
the event loop, this is the difference between one round trip per item and one per loop turn
for all of them (the Redis owner's appends of every stream).

This room holds only the batching; it must not import the engine, a backend or a store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Generic, TypeVar

import gevent
from gevent.event import AsyncResult

__all__ = ["Batcher"]

log = logging.getLogger("sse_blueprint")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Write items in batches with ``write(items) -> outcomes``.

    ``write`` returns one outcome per item, in order: a result, or an exception instance, which
    :meth:`submit` raises in that item's caller. An exception raised by ``write`` itself fails
    the whole batch. At most ``max_batch`` items go in one call.
    """

    def __init__(
        self, write: Callable[[Sequence[T]], Sequence[R | BaseException]], max_batch: int = 512
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self._pending: list[tuple[T, Callable[[R | BaseException], None]]] = []
        self._writer: gevent.Greenlet[[], None] | None = None

    def submit(self, item: T) -> R:
        """Queue ``item``, wait until its batch is written, return its outcome (or raise it)."""
        done: AsyncResult[R] = AsyncResult()
        self.enqueue(item, partial(_settle, done))
        outcome: R = done.get()
        return outcome

    def enqueue(self, item: T, on_done: Callable[[R | BaseException], None]) -> None:
        """Queue ``item`` without waiting: ``on_done`` gets its outcome (a result or an
        exception instance) on the writer's greenlet, so it must not block. Safe to call from
        the hub (a loop callback)."""
        self._pending.append((item, on_done))
        if self._writer is None:
            self._writer = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    outcomes: Sequence[R | BaseException] = self._write([i for i, _ in batch])
                except BaseException as exc:
                    failure = exc if isinstance(exc, Exception) else RuntimeError("writer stopped")
                    for _, on_done in batch:
                        _call(on_done, failure)
                    if failure is not exc:
                        raise  # (killed: the rest is served by a new writer, below)
                    continue
                for (_, on_done), outcome in zip(batch, outcomes, strict=True):
                    _call(on_done, outcome)
        finally:
            self._writer = None
            if self._pending:  # only after the writer was killed mid-batch
                self._writer = gevent.spawn(self._run)


def _settle(done: AsyncResult[R], outcome: R | BaseException) -> None:
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set(outcome)


def _call(on_done: Callable[[R | BaseException], None], outcome: R | BaseException) -> None:
    """Hand an item its outcome; a callback that fails must not cost the rest of the batch."""
    try:
        on_done(outcome)
    except Exception:
        log.exception("a batched write's callback failed")
