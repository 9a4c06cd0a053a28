"""What the engine persists, and the small interface a store implements. Imports no SQLAlchemy.

A store keeps, per stream, one :class:`StreamRecord` and one :class:`TurnBlock` per block. Both are
written by upsert and only ever move forward: a block row is replaced only by one that covers a
later event id, and a record that holds a terminal event is never changed again (the first
terminal wins), so a late or duplicate writer cannot roll anything back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["BlockStore", "StreamRecord", "TurnBlock"]


@dataclasses.dataclass(frozen=True)
class TurnBlock:
    """The aggregated content of one block of a stream, as of event ``last_event_id``."""

    stream_id: str
    block: int
    kind: str
    content: str
    first_event_id: int
    last_event_id: int


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

    def save(self, record: StreamRecord, blocks: Sequence[TurnBlock]) -> None:
        """Upsert the record and the blocks in one short transaction (forward-only)."""

    def load_stream(self, stream_id: str) -> StreamRecord | None:
        """The stream's record, or None."""

    def load_blocks(self, stream_id: str, after_id: int) -> list[TurnBlock]:
        """Blocks whose ``last_event_id`` is greater than ``after_id``, by ``last_event_id``."""
