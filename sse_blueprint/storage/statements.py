"""What goes into the tables and comes out: the forward-only upserts, built once per dialect,
and the conversions between records and rows.

Imports SQLAlchemy, the tables and the records; it must not import the engine.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Table

from .records import StreamRecord, TurnBlock, TurnEvent
from .schema import blocks as _blocks
from .schema import events as _events
from .schema import streams as _streams

__all__ = [
    "block_row", "distinct_streams", "event_row", "meta", "stream_row", "to_timestamp", "upserts",
]  # fmt: skip


class _Saving(Protocol):
    @property
    def record(self) -> StreamRecord: ...


S = TypeVar("S", bound=_Saving)


def _slot(event: TurnEvent) -> str:
    return f"latest:{event.event}" if event.replay == "latest" else f"#{event.event_id}"


def _to_datetime(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC)


def to_timestamp(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def upserts(insert: Callable[[Table], Any], returning: bool) -> tuple[Any, Any, Any]:
    """The three forward-only upserts (streams, blocks, events), built once; ``returning``
    adds a RETURNING of one key column (see :class:`~sse_blueprint.storage.sql.SQLStore`)."""
    streams = insert(_streams)
    stream_columns = [c.name for c in _streams.c if c.name not in ("id", "producer", "created_at")]
    upsert_streams = streams.on_conflict_do_update(
        index_elements=[_streams.c.id],
        set_={name: streams.excluded[name] for name in stream_columns},
        # Forward only: a stream that ended stays as it ended (the first terminal wins).
        where=(_streams.c.state == "running")
        & (_streams.c.last_event_id <= streams.excluded.last_event_id),
    )
    blocks = insert(_blocks)
    upsert_blocks = blocks.on_conflict_do_update(
        index_elements=[_blocks.c.stream_id, _blocks.c.block_index],
        set_={
            name: blocks.excluded[name]
            for name in ("kind", "meta", "content", "complete", "last_event_id", "updated_at")
        },
        # Forward only: never replace a block with an older version of itself.
        where=_blocks.c.last_event_id < blocks.excluded.last_event_id,
    )
    events = insert(_events)
    upsert_events = events.on_conflict_do_update(
        index_elements=[_events.c.stream_id, _events.c.slot],
        set_={"event_id": events.excluded.event_id, "data": events.excluded.data},
        # Forward only: a durable event is written once; a latest one replaced only by a newer
        # event of its name.
        where=_events.c.event_id < events.excluded.event_id,
    )
    if returning:
        return (
            upsert_streams.returning(_streams.c.id),
            upsert_blocks.returning(_blocks.c.block_index),
            upsert_events.returning(_events.c.slot),
        )
    return upsert_streams, upsert_blocks, upsert_events


def distinct_streams(batch: Sequence[S]) -> list[list[S]]:
    """``batch`` in groups where no stream appears twice (an upsert may touch a row once)."""
    groups: list[list[S]] = []
    seen: list[set[str]] = []
    for save in batch:
        stream_id = save.record.stream_id
        for group, ids in zip(groups, seen, strict=True):
            if stream_id not in ids:
                group.append(save)
                ids.add(stream_id)
                break
        else:
            groups.append([save])
            seen.append({stream_id})
    return groups


def stream_row(record: StreamRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "id": record.stream_id,
        "producer": record.producer,
        "state": record.state,
        "metadata": dict(record.metadata),
        "last_event_id": record.last_event_id,
        "terminal_event": record.terminal,
        "terminal_event_id": record.terminal_id,
        "terminal_data": None if record.terminal_data is None else dict(record.terminal_data),
        "created_at": _to_datetime(record.created_at),
        "updated_at": now,
        "finished_at": _to_datetime(record.finished_at),
    }


def block_row(b: TurnBlock, now: dt.datetime) -> dict[str, Any]:
    return {
        "stream_id": b.stream_id,
        "block_index": b.block,
        "kind": b.kind,
        "meta": dict(b.meta),
        "content": b.content,
        "complete": b.complete,
        "first_event_id": b.first_event_id,
        "last_event_id": b.last_event_id,
        "created_at": now,
        "updated_at": now,
    }


def event_row(e: TurnEvent, now: dt.datetime) -> dict[str, Any]:
    return {
        "stream_id": e.stream_id,
        "slot": _slot(e),
        "event_id": e.event_id,
        "event": e.event,
        "replay": e.replay,
        "data": dict(e.data),
        "created_at": now,
    }


def meta(raw: str | dict[str, Any] | None) -> Mapping[str, Any]:
    """A block's meta as read (JSON text): most blocks have none, so skip decoding ``{}``."""
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "{}":
        return {}
    value: dict[str, Any] = json.loads(raw)
    return value
