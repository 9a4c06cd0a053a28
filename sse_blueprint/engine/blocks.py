"""A block as it is streamed (:class:`BlockState`): what the producer's side builds and the
catch-up merge replays onto, and the ``turnblock_catchup`` event that replaces a block whole.

Imports the event type and the records only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._event import Event
from ..storage.records import TurnBlock

__all__ = ["BlockState", "catchup_event"]


class BlockState:
    """A block as it is being streamed (or merged on catch-up), and how much the store has."""

    __slots__ = ("complete", "first_id", "kind", "last_id", "meta", "parts", "saved_id")

    def __init__(self, kind: str, meta: Mapping[str, Any], first_id: int) -> None:
        self.kind = kind
        self.meta: dict[str, Any] = dict(meta)
        self.parts: list[str] = []
        self.complete = False
        self.first_id = first_id
        self.last_id = first_id
        self.saved_id = 0

    @classmethod
    def from_row(cls, row: TurnBlock) -> BlockState:
        block = cls(row.kind, row.meta, row.first_event_id)
        block.parts.append(row.content)
        block.complete = row.complete
        block.last_id = row.last_event_id
        return block

    def content(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def apply(self, ev: Event) -> None:
        """Apply one of the block's events (the contract's client rule)."""
        data = ev.data
        if ev.event == "text_delta":
            self.parts.append(data["text"])
        elif ev.event == "block_end":
            self.meta.update(data.get("meta") or {})
            self.complete = True
        else:  # block_start
            self.kind, self.meta, self.parts = data["kind"], dict(data.get("meta") or {}), []
            self.complete = False
        self.last_id = ev.id

    def row(self, stream_id: str, index: int) -> TurnBlock:
        return TurnBlock(
            stream_id, index, self.kind, self.content(), self.first_id, self.last_id,
            dict(self.meta), self.complete,
        )  # fmt: skip

    def catchup_event(self, index: int) -> Event:
        return catchup_event(
            index, self.kind, self.meta, self.content(), self.complete, self.last_id
        )


def catchup_event(
    index: int, kind: str, meta: Mapping[str, Any], content: str, complete: bool, last_id: int
) -> Event:
    """The ``turnblock_catchup`` that replaces block ``index`` whole, under the id it covers."""
    data = {"block": index, "kind": kind, "meta": meta, "content": content, "complete": complete}
    return Event(last_id, "turnblock_catchup", data)
