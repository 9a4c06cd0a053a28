"""A stream's life: its states, and the exceptions that end it or refuse it.

Imports nothing of the package.
"""

from __future__ import annotations

import enum

__all__ = [
    "ProducerError",
    "ShuttingDown",
    "StreamClosed",
    "StreamLimitReached",
    "StreamState",
]


class StreamState(enum.StrEnum):
    """Life-cycle of a stream. Only ``RUNNING`` is not terminal."""

    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


class StreamClosed(Exception):
    """Raised in a producer that sends (or sleeps) after its stream was cancelled or timed out.

    Producers need not catch it: the stream already holds its terminal event.
    """


class ProducerError(Exception):
    """Raise in a producer to end the stream with an ``error`` event showing this message.

    Any other exception also ends the stream with ``error``, but with a generic message, so that
    internals never leak to clients.
    """


class StreamLimitReached(Exception):
    """The registry already runs as many streams as it may."""


class ShuttingDown(StreamLimitReached):
    """The registry is shutting down and starts no new stream."""
