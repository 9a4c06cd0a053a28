"""What the engine persists, and the small interface a store implements. Imports no SQLAlchemy.

A store keeps, per stream, one :class:`StreamRecord`, one :class:`TurnBlock` per block, and the
turn's replayable app events (:class:`TurnEvent`): every ``durable`` one, and the newest ``latest``
one of each name. All are written by upsert and only ever move forward: a block row is replaced only
by one that covers a later event id, a ``latest`` row only by a newer event of its name, and a
record that holds a terminal event is never changed again (the first terminal wins), so a late or
duplicate writer cannot roll anything back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["BlockStore", "StoredTurn", "StreamRecord", "TurnBlock", "TurnEvent"]


@dataclasses.dataclass(frozen=True)
class TurnBlock:
    """One block of a stream's turn as of event ``last_event_id``: its ``kind``, ``meta`` (a JSON
    object), ``content`` (the text streamed into it) and whether its ``block_end`` came."""

    stream_id: str
    block: int
    kind: str
    content: str
    first_event_id: int
    last_event_id: int
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False


@dataclasses.dataclass(frozen=True)
class TurnEvent:
    """An app event replayed on catch-up: ``replay`` is ``durable`` or ``latest``."""

    stream_id: str
    event_id: int
    event: str
    data: Mapping[str, Any]
    replay: str = "durable"


@dataclasses.dataclass(frozen=True)
class StoredTurn:
    """What a store holds of a turn past some event id (see :meth:`BlockStore.load_turn`)."""

    blocks: Sequence[TurnBlock] = ()
    events: Sequence[TurnEvent] = ()


@dataclasses.dataclass(frozen=True)
class StreamRecord:
    """A stream's durable state. ``terminal`` is the terminal event's name once it ended."""

    stream_id: str
    producer: str
    state: str
    last_event_id: int
    created_at: float
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    finished_at: float | None = None
    terminal: str | None = None
    terminal_id: int | None = None
    terminal_data: Mapping[str, Any] | None = None


class BlockStore(Protocol):
    """Where turn blocks and stream records live (``SQLStore`` is the one shipped)."""

    def save(
        self,
        record: StreamRecord,
        blocks: Sequence[TurnBlock],
        events: Sequence[TurnEvent] = (),
    ) -> None:
        """Upsert the record, blocks and events in one short transaction (forward-only)."""

    def load_stream(self, stream_id: str) -> StreamRecord | None:
        """The stream's record, or None."""

    def load_turn(self, stream_id: str, after_id: int) -> StoredTurn:
        """Blocks whose ``last_event_id`` is greater than ``after_id``, and the events whose id
        is, each in id order."""
