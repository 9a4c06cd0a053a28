"""The catch-up merge (:func:`catch_up`): what the store holds and a stretch of the live buffer
as one exact snapshot in id order, for a reader that resumes from an id older than the buffer;
live catch-up and store-only replay both use it.

Imports the event type, the records and the block state only.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._event import BLOCK_EVENTS, LATEST, Event
from ..storage.records import StoredTurn, TurnBlock
from .blocks import BlockState, catchup_event

__all__ = ["catch_up"]


def catch_up(stored: StoredTurn, buffered: Sequence[Event], after: int) -> list[Event]:
    """One exact snapshot for a reader at ``after``: the store's blocks and events merged with
    ``buffered`` (the live buffer from where the store's coverage may end), in id order.

    Each block the store has past ``after`` becomes one ``turnblock_catchup`` (the buffer's
    later events for it applied first) under the id of the last event it covers. Durable events
    come once each; of ``latest`` events only the newest of each name; every other buffered
    event past ``after`` as it is.
    """
    # A row no buffered event touches becomes its event directly (store-only replay: all).
    blocks: dict[int, TurnBlock | BlockState] = {row.block: row for row in stored.blocks}
    out: list[Event] = []
    latest: dict[str, Event] = {}
    stored_ids: set[int] = set()
    for row in stored.events:
        stored_ids.add(row.event_id)
        ev = Event(row.event_id, row.event, row.data, row.replay)
        if row.replay == LATEST:
            _keep_newest(latest, ev)
        else:
            out.append(ev)
    for ev in buffered:
        if ev.event in BLOCK_EVENTS:
            index = ev.data["block"]
            found = blocks.get(index)
            if found is not None:
                if isinstance(found, TurnBlock):
                    if ev.id <= found.last_event_id:
                        continue
                    found = blocks[index] = BlockState.from_row(found)
                if ev.id > found.last_id:
                    found.apply(ev)
                continue
        if ev.id <= after or ev.id in stored_ids:
            continue
        if ev.replay == LATEST:
            _keep_newest(latest, ev)
        else:
            out.append(ev)
    out.extend(ev for ev in latest.values() if ev.id > after)
    for index, block in blocks.items():
        if isinstance(block, TurnBlock):
            kind, meta, content = block.kind, block.meta, block.content
            event = catchup_event(index, kind, meta, content, block.complete, block.last_event_id)
            out.append(event)
        else:
            out.append(block.catchup_event(index))
    out.sort(key=_event_id)
    return out


def _keep_newest(latest: dict[str, Event], ev: Event) -> None:
    held = latest.get(ev.event)
    if held is None or held.id < ev.id:
        latest[ev.event] = ev


def _event_id(event: Event) -> int:
    return event.id
