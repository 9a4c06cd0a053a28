"""The one backoff rule of the server side: exponential from ``first``, capped, maybe jittered.

Used by the persister (a store that fails), the Redis connection (a call Redis did not run), the
Pub/Sub reader (a lost connection) and the relays (an upstream that fails before its first
token). The Python client has its own, public, ``Backoff`` (full jitter, the server's ``retry:``).

Imports nothing of the package.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays ``first``, ``2·first``, ``4·first``, … up to ``cap``; with ``jitter`` each is drawn
    from its upper half (``uniform(d/2, d)``), so many waiters do not come back at once."""

    __slots__ = ("_next", "cap", "first", "jitter")

    def __init__(self, first: float, cap: float, *, jitter: bool = False) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._next = first

    def peek(self) -> float:
        """The next delay's upper bound, without taking it."""
        return self._next

    def delay(self) -> float:
        """The next delay (the one after it doubles, up to ``cap``)."""
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay

    def reset(self) -> None:
        """It worked: the next failure starts from ``first`` again."""
        self._next = self.first
