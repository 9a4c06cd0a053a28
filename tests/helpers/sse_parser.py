"""A test-side SSE parser that follows the WHATWG rules ("Interpreting an event stream").

Independent of the library's encoder on purpose: the tests check our bytes against the spec's
parsing algorithm, not against our own assumptions. Also: the delta/catch-up rule of the contract.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class ParsedEvent:
    type: str
    data: str
    last_event_id: str

    @property
    def id(self) -> int:
        return int(self.last_event_id)

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental parser: ``feed(bytes)`` returns the events dispatched so far."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._started = False
        self._data = ""
        self._type = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes, final: bool = False) -> list[ParsedEvent]:
        self._buf += self._decoder.decode(chunk, final)
        if not self._started and self._buf:
            self._started = True
            if self._buf.startswith("\ufeff"):
                self._buf = self._buf[1:]
        out: list[ParsedEvent] = []
        while True:
            cr, lf = self._buf.find("\r"), self._buf.find("\n")
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            i = min(ends)
            if self._buf[i] == "\r":
                if i + 1 == len(self._buf) and not final:
                    break  # might be the CR of a CRLF split across chunks
                width = 2 if self._buf[i + 1 : i + 2] == "\n" else 1
            else:
                width = 1
            line, self._buf = self._buf[:i], self._buf[i + width :]
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> ParsedEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._type = value
        elif field == "data":
            self._data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ParsedEvent | None:
        data, etype = self._data, self._type
        self._data, self._type = "", ""
        if data == "":
            return None
        if data.endswith("\n"):
            data = data[:-1]
        return ParsedEvent(etype or "message", data, self.last_event_id)


class Transcript:
    """The contract's client rule for whole turns, written from the contract, not the library.

    ``block_start`` makes a block ``{kind, meta, content: "", complete: False}``; ``text_delta``
    appends (a block first seen there is kind ``text``); ``block_end`` merges meta and completes
    it; ``turnblock_catchup`` replaces it whole. Every other non-terminal event is an app event:
    ``events`` lists them in arrival order, ``latest`` holds the newest of each name.
    """

    BLOCK_EVENTS = ("block_start", "text_delta", "block_end", "turnblock_catchup")
    ENGINE_EVENTS = ("start", "done", "error", "cancelled")

    def __init__(self) -> None:
        self.turn: dict[int, dict[str, Any]] = {}
        self.delta_ids: list[int] = []
        self.ids: list[int] = []
        self.events: list[tuple[int, str, Any]] = []
        self.app_events: list[tuple[int, str, Any]] = []
        self.latest: dict[str, tuple[int, Any]] = {}

    def apply(self, event_id: int, event: str, data: Any) -> None:
        self.ids.append(event_id)
        self.events.append((event_id, event, data))
        if event == "block_start":
            self.turn[data["block"]] = {
                "kind": data["kind"], "meta": dict(data["meta"]), "content": "", "complete": False
            }  # fmt: skip
        elif event == "text_delta":
            self.delta_ids.append(event_id)
            block = self.turn.setdefault(
                data["block"], {"kind": "text", "meta": {}, "content": "", "complete": False}
            )
            block["content"] += data["text"]
        elif event == "block_end":
            block = self.turn.setdefault(
                data["block"], {"kind": "text", "meta": {}, "content": "", "complete": False}
            )
            block["meta"].update(data["meta"])
            block["complete"] = True
        elif event == "turnblock_catchup":
            self.turn[data["block"]] = {
                "kind": data["kind"],
                "meta": dict(data["meta"]),
                "content": data["content"],
                "complete": data["complete"],
            }
        elif event not in self.ENGINE_EVENTS:
            self.app_events.append((event_id, event, data))
            held = self.latest.get(event)
            if held is None or held[0] < event_id:
                self.latest[event] = (event_id, data)

    @property
    def blocks(self) -> dict[int, str]:
        return {k: v["content"] for k, v in self.turn.items()}

    @property
    def last_id(self) -> int:
        return self.ids[-1] if self.ids else 0

    @property
    def terminal(self) -> str | None:
        if self.events and self.events[-1][1] in ("done", "error", "cancelled"):
            return self.events[-1][1]
        return None

    def text(self) -> str:
        """The answer: the ``text`` blocks' content in order."""
        turn = self.turn
        return "".join(turn[k]["content"] for k in sorted(turn) if turn[k]["kind"] == "text")
