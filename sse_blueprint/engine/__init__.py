"""The stream engine: producers, the live buffer, fan-out, persistence and resume. No Flask.

    lifecycle     states and the exceptions that end or refuse a stream
    context       what a producer gets (ProducerContext, Block)
    subscription  a reader's cursor into the live buffer
    log           the live buffer (EventLog): positions, visibility, trimming
    stream        one producer run: its buffer, readers, fan-out, persistence, catch-up
    mirror        another worker's stream, followed here for this worker's readers
    registry      a worker's streams, and streams that live only in the store
    ports         what the engine needs from a backend shared between workers

Nothing here imports Flask, SQLAlchemy, Redis or the web layer; those import this.
"""

from __future__ import annotations

from .._event import TERMINAL_EVENTS, Event
from .context import Block, Producer, ProducerContext
from .lifecycle import ProducerError, ShuttingDown, StreamClosed, StreamLimitReached, StreamState
from .mirror import Mirror
from .ports import SharedBackend, StreamBackend
from .registry import LOST_ID_GAP, StreamRegistry, lost, lost_data, replay
from .stream import Stream, new_stream_id
from .subscription import Subscription

__all__ = [
    "Block",
    "Event",
    "LOST_ID_GAP",
    "Mirror",
    "Producer",
    "ProducerContext",
    "ProducerError",
    "SharedBackend",
    "ShuttingDown",
    "Stream",
    "StreamBackend",
    "StreamClosed",
    "StreamLimitReached",
    "StreamRegistry",
    "StreamState",
    "Subscription",
    "TERMINAL_EVENTS",
    "lost",
    "lost_data",
    "new_stream_id",
    "replay",
]
