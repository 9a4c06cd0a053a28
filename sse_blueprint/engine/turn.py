"""Turns of typed blocks: what a producer's events build (:class:`TurnBuilder`).

A *turn* is numbered blocks, each ``{kind, meta, content, complete}``, and the app's replayable
events. :class:`TurnBuilder` follows a stream's events on the producer's side: it checks every
event before it is numbered (a producer gets a ``ValueError`` naming the fault: a bad kind, text
for a block that ended, meta too big, too many durable events), keeps the blocks and the events
the store does not have yet, and hands them to the persister. Events a shared backend has not
acknowledged yet are *ahead* (:meth:`TurnBuilder.expect`): later checks count them, but they
build nothing until they are applied, and are forgotten if the backend refuses them. The
catch-up merge is :mod:`.catchup`'s.

Imports no Flask, SQLAlchemy or gevent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .. import _wire
from .._event import BLOCK_EVENTS, DURABLE, LATEST, REPLAY_MODES, RESERVED_EVENTS, Event
from ..storage.records import TurnBlock, TurnEvent
from .blocks import BlockState

__all__ = ["KIND_PATTERN", "TurnBuilder"]

#: A block kind: ``text``, ``reasoning``, ``tool_call``, ``tool_result`` or an app's own.
KIND_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
MAX_EVENT_NAME = 128


def _block_index(data: Mapping[str, Any]) -> int:
    index = data.get("block")
    if type(index) is not int or index < 0:
        raise ValueError('"block" must be an integer >= 0')
    return index


def _meta(data: Mapping[str, Any], event: str) -> Mapping[str, Any]:
    meta = data.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ValueError(f'{event} "meta" must be a mapping (a JSON object)')
    return meta


class TurnBuilder:
    """The producer side of a turn: checks events, builds blocks, keeps what is unsaved.

    ``max_meta_bytes`` bounds a block's meta (as JSON, after ``block_end`` merged into it);
    ``max_events`` bounds the replayable app events of a stream (every durable one, and one per
    ``latest`` name).
    """

    def __init__(self, *, max_meta_bytes: int = 65536, max_events: int = 1000) -> None:
        self.max_meta_bytes = max_meta_bytes
        self.max_events = max_events
        self.blocks: dict[int, BlockState] = {}
        self.next_block = 0  # what :meth:`ProducerContext.block` numbers next
        self._dirty: set[int] = set()  # blocks with events the store does not have yet
        self._events: list[Event] = []  # durable events not saved yet, in id order
        self._latest: dict[str, Event] = {}  # the newest unsaved ``latest`` event of a name
        self._latest_names: set[str] = set()
        self._durable_count = 0
        # Ahead (numbered, not applied yet: on their way to a shared backend): each block as
        # those events leave it (meta, complete), their replayable events, the newest one's id.
        self._ahead: dict[int, tuple[dict[str, Any], bool]] = {}
        self._ahead_durable = 0
        self._ahead_latest: set[str] = set()
        self._ahead_last = 0

    # -- before an event is numbered ---------------------------------------------------------

    def check(self, event: str, data: Mapping[str, Any], replay: str) -> None:
        """Raise ``ValueError`` if the producer may not send this event now."""
        if event in BLOCK_EVENTS:
            if replay != DURABLE:
                raise ValueError(f"{event} builds a block; it cannot be sent {replay!r}")
            self._check_block_event(event, data)
            return
        # (Reserved names never get here: ProducerContext.send refuses them first.)
        if replay not in REPLAY_MODES:
            raise ValueError(f"replay must be one of {', '.join(REPLAY_MODES)}, not {replay!r}")
        if len(event) > MAX_EVENT_NAME:
            raise ValueError(f"event names are at most {MAX_EVENT_NAME} characters")
        names = self._latest_names
        stored = self._durable_count + len(names) + self._ahead_durable + len(self._ahead_latest)
        new_name = event not in names and event not in self._ahead_latest
        if (replay == DURABLE or (replay == LATEST and new_name)) and stored >= self.max_events:
            raise ValueError(
                f"this stream already has {stored} replayable events (SSE_MAX_DURABLE_EVENTS "
                f"= {self.max_events}); send more as replay='latest' (one per name) or "
                "'ephemeral', or put them in a block"
            )

    def _view(self, index: int) -> tuple[Mapping[str, Any], bool] | None:
        """Block ``index``'s meta and whether it ended, counting the events ahead."""
        ahead = self._ahead.get(index)
        if ahead is not None:
            return ahead
        block = self.blocks.get(index)
        return None if block is None else (block.meta, block.complete)

    def _check_block_event(self, event: str, data: Mapping[str, Any]) -> None:
        index = _block_index(data)
        block = self._view(index)
        if event == "block_start":
            kind = data.get("kind")
            if not isinstance(kind, str) or KIND_PATTERN.fullmatch(kind) is None:
                raise ValueError(
                    f"block kind {kind!r} must match [a-z][a-z0-9_.-]{{0,63}} "
                    "(text, reasoning, tool_call, tool_result, or your own)"
                )
            if block is not None:
                raise ValueError(f"block {index} was already started")
            self._check_meta_size(index, _meta(data, event))
            return
        if block is not None and block[1]:
            raise ValueError(f"block {index} has ended; start a new block")
        if event == "text_delta":
            if not isinstance(data.get("text"), str):
                raise ValueError('text_delta data must be {"block": int >= 0, "text": str}')
            return
        meta = _meta(data, event)  # block_end
        if block is not None and meta:
            self._check_meta_size(index, {**block[0], **meta})
        else:
            self._check_meta_size(index, meta)

    def _check_meta_size(self, index: int, meta: Mapping[str, Any]) -> None:
        try:
            size = len(_wire.dumps(meta).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"block {index} meta is not JSON: {exc}") from exc
        if size > self.max_meta_bytes:
            raise ValueError(
                f"block {index} meta is {size} bytes as JSON, more than SSE_MAX_META_BYTES "
                f"({self.max_meta_bytes}); stream large values as the block's content"
            )

    def expect(self, ev: Event) -> None:
        """``ev`` (checked) is numbered but on its way to a shared backend: count it in later
        checks, until :meth:`apply` takes it or :meth:`forget_ahead` drops it."""
        self._ahead_last = ev.id
        name, data = ev.event, ev.data
        if name in BLOCK_EVENTS:
            index: int = data["block"]
            self.next_block = max(self.next_block, index + 1)
            if name == "block_start":
                self._ahead[index] = (dict(data.get("meta") or {}), False)
            elif name == "block_end":
                view = self._view(index)
                meta = {**(view[0] if view else {}), **(data.get("meta") or {})}
                self._ahead[index] = (meta, True)
            elif self._view(index) is None:  # text for a new block makes it a text block
                self._ahead[index] = ({}, False)
        elif name in RESERVED_EVENTS:
            pass
        elif ev.replay == DURABLE:
            self._ahead_durable += 1
        elif ev.replay == LATEST and name not in self._latest_names:
            self._ahead_latest.add(name)

    def forget_ahead(self) -> None:
        """The events ahead were refused (the stream ended elsewhere): they never happened."""
        self._ahead.clear()
        self._ahead_latest.clear()
        self._ahead_durable = 0
        self._ahead_last = 0

    # -- once it is in the log ---------------------------------------------------------------

    def apply(self, ev: Event) -> bool:
        """Follow an event now in the stream; True when a block ended (worth persisting now)."""
        if ev.id <= self._ahead_last:
            self._arrived(ev)
        name = ev.event
        if name in BLOCK_EVENTS:
            index: int = ev.data["block"]
            block = self.blocks.get(index)
            if block is None:
                block = self.blocks[index] = BlockState("text", {}, ev.id)
                self.next_block = max(self.next_block, index + 1)
            block.apply(ev)
            self._dirty.add(index)
            return name == "block_end"
        if name in RESERVED_EVENTS:
            return False
        if ev.replay == DURABLE:
            self._events.append(ev)
            self._durable_count += 1
        elif ev.replay == LATEST:
            self._latest[name] = ev
            self._latest_names.add(name)
        return False

    def _arrived(self, ev: Event) -> None:
        """An event that was ahead is applied now: it counts as applied, no longer as ahead."""
        if ev.id == self._ahead_last:
            self.forget_ahead()  # the last one: what was ahead is all applied
        elif ev.event not in BLOCK_EVENTS and ev.event not in RESERVED_EVENTS:
            if ev.replay == DURABLE:
                self._ahead_durable -= 1
            elif ev.replay == LATEST:
                self._ahead_latest.discard(ev.event)

    # -- persistence ---------------------------------------------------------------------------

    def unsaved(self, stream_id: str) -> tuple[list[TurnBlock], list[TurnEvent]]:
        """What the store does not have yet (a snapshot: taking it does not block)."""
        blocks = [self.blocks[i].row(stream_id, i) for i in sorted(self._dirty)]
        events = [
            TurnEvent(stream_id, ev.id, ev.event, ev.data, ev.replay)
            for ev in (*self._events, *self._latest.values())
        ]
        return blocks, events

    def saved(self, blocks: Sequence[TurnBlock], events: Sequence[TurnEvent]) -> None:
        """The store now has ``blocks`` and ``events`` (as returned by :meth:`unsaved`)."""
        for row in blocks:
            block = self.blocks[row.block]
            block.saved_id = max(block.saved_id, row.last_event_id)
            if block.last_id <= block.saved_id:
                self._dirty.discard(row.block)
        durable = sum(1 for e in events if e.replay == DURABLE)
        del self._events[:durable]  # events are only appended, so the saved ones come first
        for saved_event in events:
            newest = self._latest.get(saved_event.event)
            saved_newest = newest is not None and newest.id == saved_event.event_id
            if saved_event.replay == LATEST and saved_newest:
                del self._latest[saved_event.event]
