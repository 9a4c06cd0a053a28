"""A stream's live buffer: the event log that every reader is a cursor into.

Events are kept in the order of their ids, which strictly increase. Positions are absolute: the
event at position ``p`` is ``events[p - base]``; ``end`` is one past the newest. Trimming drops
the oldest events and moves ``base``, so a reader's position stays valid. ``visible`` is how far
readers may read (the end, or in durable delivery only what the store has).

Imports the event type only; it must not import the stream, its readers or any I/O.
"""

from __future__ import annotations

import bisect

from .._event import Event

__all__ = ["EventLog"]


def _event_id(event: Event) -> int:
    return event.id


class EventLog:
    """The live buffer (see the module docstring)."""

    __slots__ = ("base", "end", "events", "last_id", "trim_to", "trimmed_id", "visible")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.base = 0  # the position of events[0]
        self.end = 0  # one past the newest: base + len(events)
        self.visible = 0  # readers see positions below this
        self.last_id = 0  # the newest event's id (0: none yet)
        self.trimmed_id = 0  # the newest id dropped from the buffer (0: none)
        self.trim_to = 0  # drop up to this id once no reader holds the events back

    def __len__(self) -> int:
        return len(self.events)

    def append(self, ev: Event) -> None:
        self.last_id = ev.id
        self.events.append(ev)
        self.end += 1

    def position_after(self, last_event_id: int) -> int:
        """The position of the first event with an id greater than ``last_event_id``."""
        return self.base + bisect.bisect_right(self.events, last_event_id, key=_event_id)

    def after(self, last_event_id: int) -> list[Event]:
        """The buffered events with ids greater than ``last_event_id``."""
        return self.events[self.position_after(last_event_id) - self.base :]

    def visible_from(self, pos: int) -> list[Event]:
        """What a reader at ``pos`` may take now."""
        return self.events[pos - self.base : self.visible - self.base]

    def drop(self, up_to_id: int, keep_from: int) -> int:
        """Drop the events with ids up to ``up_to_id`` but none at or past position
        ``keep_from`` (what readers still need, and the newest event); how many went."""
        count = min(self.position_after(up_to_id), keep_from) - self.base
        if count <= 0:
            return 0
        self.trimmed_id = self.events[count - 1].id
        del self.events[:count]
        self.base += count
        return count

    def start_at(self, first_id: int) -> None:
        """An empty log whose first event will be ``first_id``: what came before is trimmed."""
        self.trimmed_id = self.trim_to = self.last_id = first_id - 1
