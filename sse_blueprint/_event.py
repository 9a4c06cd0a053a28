"""One event of a stream, encoded once. Imports no Flask, SQLAlchemy or gevent.

Also the event names the engine gives meaning to, and how an app event is replayed on catch-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _wire

__all__ = [
    "BLOCK_EVENTS",
    "DURABLE",
    "EPHEMERAL",
    "LATEST",
    "REPLAY_MODES",
    "RESERVED_EVENTS",
    "TERMINAL_EVENTS",
    "Event",
]

TERMINAL_EVENTS = frozenset({"done", "error", "cancelled"})
#: Names only the engine sends.
RESERVED_EVENTS = TERMINAL_EVENTS | {"start", "turnblock_catchup"}
#: The events that build a turn's blocks (catch-up replaces them with ``turnblock_catchup``).
BLOCK_EVENTS = frozenset({"block_start", "text_delta", "block_end"})

#: How catch-up replays an app event: every one (``durable``), only the newest of its name
#: (``latest``), or not at all once it left the live buffer (``ephemeral``).
DURABLE, LATEST, EPHEMERAL = "durable", "latest", "ephemeral"
REPLAY_MODES = (DURABLE, LATEST, EPHEMERAL)


class Event:
    """One event of a stream: integer ``id``, ``event`` name and a JSON object ``data``.

    The JSON and SSE encodings are made once, when the event is created, and shared by every
    subscriber; NDJSON is made on first use. ``replay`` says how catch-up treats an app event.
    """

    __slots__ = ("_ndjson", "data", "event", "id", "json", "replay", "sse")

    def __init__(self, id: int, event: str, data: Mapping[str, Any], replay: str = DURABLE) -> None:
        self.id = id
        if not event:
            raise ValueError("event name must be a non-empty string")
        self.event = _wire.check_event_name(event)
        self.data = data
        if not isinstance(data, Mapping):
            raise ValueError(
                f"event data must be a mapping (a JSON object), not {type(data).__name__}"
            )
        try:
            self.json = _wire.dumps(data)
        except TypeError as exc:
            raise ValueError(f"event data is not JSON-serializable: {exc}") from exc
        self.sse = _wire.encode_event(self.json, id=id, event=event)
        self.replay = replay
        self._ndjson: bytes | None = None

    @property
    def ndjson(self) -> bytes:
        if self._ndjson is None:
            self._ndjson = _wire.encode_ndjson(self.id, self.event, self.json)
        return self._ndjson

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def __repr__(self) -> str:
        return f"Event(id={self.id}, event={self.event!r}, data={self.json})"
