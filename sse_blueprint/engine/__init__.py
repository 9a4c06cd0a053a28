"""The stream engine: producers, the live buffer, fan-out, persistence and resume. No Flask.

    stream        one producer run, composed of the parts below; the one way it ends
    lifecycle     states and the exceptions that end or refuse a stream
    context       what a producer gets (ProducerContext, Block)
    producer      the producer's run on its greenlet: start, sleep, stop, timeout
    log           the live buffer (EventLog): positions, visibility, trimming
    readers       the reader set: where readers start, wake-ups, lag cuts, the trim that spares them
    fanout        the parked readers of a stream, written to by one greenlet or the wake-up
    subscription  a reader's cursor into the live buffer, and its catch-up from the store
    persister     writes the turn to the store in the background, and retries
    mirror        another worker's stream, followed here for this worker's readers
    registry      a worker's streams, and streams that live only in the store
    turn          the block aggregator (TurnBuilder: typed turns) and the catch-up merge
    status        a stream's status as one type, however it was found
    ports         what the engine needs from a backend shared between workers

Nothing here imports Flask, SQLAlchemy, Redis or the web layer; those import this.
"""

from __future__ import annotations

from .._errors import Unavailable
from .._event import TERMINAL_EVENTS, Event
from .context import Block, Producer, ProducerContext
from .lifecycle import (
    ProducerError,
    ShuttingDown,
    StreamClosed,
    StreamLimitReached,
    StreamState,
)
from .mirror import Mirror
from .ports import Appended, SharedBackend, StreamBackend
from .registry import LOST_ID_GAP, StreamRegistry, lost, lost_data, replay
from .status import StreamStatus, status_of
from .stream import Stream, new_stream_id
from .subscription import Subscription

__all__ = [
    "Appended",
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
    "StreamStatus",
    "Subscription",
    "TERMINAL_EVENTS",
    "Unavailable",
    "lost",
    "lost_data",
    "new_stream_id",
    "replay",
    "status_of",
]
