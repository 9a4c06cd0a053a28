"""The Vercel AI SDK's UI message stream: a stream's turn as the parts ``useChat`` rebuilds.

``GET /api/streams/<id>?format=ai-sdk`` answers in the protocol the ``ai`` package reads
(``x-vercel-ai-ui-message-stream: v1``: one JSON chunk per ``data:`` line, ``data: [DONE]`` at the
end). The answer always starts at the turn's beginning, with ``start`` and the stream's id as the
message id, because that is what the SDK's resume expects: on ``resume-stream`` it resets the
message at the first ``start`` and replaces the message of that id, so a replay never shows a
message twice. Then, per block: ``text`` → ``text-start/-delta/-end``, ``reasoning`` →
``reasoning-start/-delta/-end``, ``tool_call`` → ``tool-input-start/-delta`` and
``tool-input-available`` (or ``tool-input-error``) at its end, ``tool_result`` →
``tool-output-available`` (``tool-output-error`` when its meta says ``is_error``) at its end; an
app's own kind → a ``data-<kind>`` part (id ``block-<n>``) at its start and end. App events →
``data-<event>`` parts: durable ones under their own id, ``latest`` ones under the event's name
(so the newest replaces the rest), ephemeral ones ``transient``. ``done`` → ``finish`` (with the
done data as message metadata), ``error`` → ``error``, ``cancelled`` → ``abort``. An answer cut
short before the end (a reader released at shutdown) ends with an ``error`` chunk, never as if
the message were finished.

Imports the event type and the wire module only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .. import _wire
from .._event import EPHEMERAL, LATEST, Event

__all__ = ["HEADERS", "UIMessageStream"]

#: What the SDK's own server helpers send (``UI_MESSAGE_STREAM_HEADERS``).
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE = _wire.encode_event("[DONE]")
INTERRUPTED = "the stream was interrupted before its end; resume it to continue"

_FINISH_REASONS = {
    "stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "length": "length", "max_tokens": "length", "max_output_tokens": "length",
    "tool_calls": "tool-calls", "tool_use": "tool-calls", "function_call": "tool-calls",
    "content_filter": "content-filter", "refusal": "content-filter",
}  # fmt: skip


#: The kinds that have UI parts of their own; every other kind is a ``data-<kind>`` part.
_NATIVE_KINDS = frozenset({"text", "reasoning", "tool_call", "tool_result"})


def chunk(part: Mapping[str, Any]) -> bytes:
    """One UI message part as an SSE event (data only, as the SDK's servers send it)."""
    return _wire.encode_event(_wire.dumps(part))


class _Part:
    __slots__ = ("content", "id", "kind", "meta")

    def __init__(self, index: int, kind: str, meta: Mapping[str, Any]) -> None:
        self.id = f"block-{index}"
        self.kind = kind
        self.meta = dict(meta)
        self.content: list[str] = []

    @property
    def call_id(self) -> str:
        return str(self.meta.get("call_id") or self.id)

    def text(self) -> str:
        return "".join(self.content)


class UIMessageStream:
    """One response's translation: the events of one reader, in order, to UI message chunks."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.parts: dict[int, _Part] = {}
        self.calls: dict[str, str] = {}  # tool call id → tool name, for the results

    def start(self) -> bytes:
        return chunk({"type": "start", "messageId": self.stream_id})

    def interrupted(self) -> bytes:
        """The end of an answer cut short (the reader fell behind, or the server is restarting)
        before the stream's own end: an ``error`` chunk, so the SDK does not take the partial
        message for a finished one; resuming (``resumeStream``) replays the turn whole."""
        return chunk({"type": "error", "errorText": INTERRUPTED})

    def encode(self, events: list[Event]) -> bytes:
        return b"".join([self._event(ev) for ev in events])

    def _event(self, ev: Event) -> bytes:
        name, data = ev.event, ev.data
        if name == "text_delta":
            return self._delta(data["block"], data["text"])
        if name == "block_start":
            return self._start(data["block"], data["kind"], data.get("meta") or {})
        if name == "block_end":
            return self._end(data["block"], data.get("meta") or {})
        if name == "turnblock_catchup":
            index, kind, meta = data["block"], data["kind"], data.get("meta") or {}
            if kind not in _NATIVE_KINDS:  # an app's kind: one data part, as the block is now
                block = self.parts[index] = _Part(index, kind, meta)
                block.content.append(data["content"])
                return self._data(block, complete=bool(data.get("complete")))
            out = self._start(index, kind, meta) + self._delta(index, data["content"])
            return out + (self._end(index, {}) if data.get("complete") else b"")
        if name == "start":
            return b""  # sent by :meth:`start`, once, whatever the reader's position
        if name == "done":
            finish: dict[str, Any] = {"type": "finish", "finishReason": _finish_reason(data)}
            if data:
                finish["messageMetadata"] = dict(data)
            return chunk(finish) + DONE
        if name == "error":
            return chunk({"type": "error", "errorText": str(data.get("message", "error"))}) + DONE
        if name == "cancelled":
            reason = data.get("reason")
            abort = {"type": "abort", **({"reason": reason} if isinstance(reason, str) else {})}
            return chunk(abort) + DONE
        part: dict[str, Any] = {"type": f"data-{name}", "data": dict(data)}
        if ev.replay == EPHEMERAL:
            part["transient"] = True
        else:
            part["id"] = name if ev.replay == LATEST else f"event-{ev.id}"
        return chunk(part)

    def _start(self, index: int, kind: str, meta: Mapping[str, Any]) -> bytes:
        part = self.parts[index] = _Part(index, kind, meta)
        if kind == "text":
            return chunk({"type": "text-start", "id": part.id})
        if kind == "reasoning":
            return chunk({"type": "reasoning-start", "id": part.id})
        if kind == "tool_call":
            name = str(part.meta.get("name") or "tool")
            self.calls[part.call_id] = name
            return chunk({"type": "tool-input-start", "toolCallId": part.call_id, "toolName": name})
        if kind == "tool_result":
            return b""  # its output goes out whole, at its end
        return self._data(part, complete=False)

    def _delta(self, index: int, text: str) -> bytes:
        part = self.parts.get(index)
        out = b""
        if part is None:  # a block first seen at its text is a text block
            out = self._start(index, "text", {})
            part = self.parts[index]
        if not text:
            return out
        part.content.append(text)
        if part.kind == "text":
            return out + chunk({"type": "text-delta", "id": part.id, "delta": text})
        if part.kind == "reasoning":
            return out + chunk({"type": "reasoning-delta", "id": part.id, "delta": text})
        if part.kind == "tool_call":
            delta = {"type": "tool-input-delta", "toolCallId": part.call_id, "inputTextDelta": text}
            return out + chunk(delta)
        return out

    def _end(self, index: int, meta: Mapping[str, Any]) -> bytes:
        part = self.parts.get(index)
        if part is None:
            return b""
        part.meta.update(meta)
        if part.kind == "text":
            return chunk({"type": "text-end", "id": part.id})
        if part.kind == "reasoning":
            return chunk({"type": "reasoning-end", "id": part.id})
        if part.kind == "tool_call":
            return self._tool_input(part)
        if part.kind == "tool_result" and part.call_id in self.calls:
            if part.meta.get("is_error"):
                error = {"type": "tool-output-error", "toolCallId": part.call_id}
                return chunk({**error, "errorText": part.text()})
            output = _json_or_text(part.text())
            return chunk({"type": "tool-output-available", "toolCallId": part.call_id,
                          "output": output})  # fmt: skip
        return self._data(part, complete=True)

    def _tool_input(self, part: _Part) -> bytes:
        head = {"toolCallId": part.call_id, "toolName": self.calls[part.call_id]}
        if "input_error" in part.meta:
            error = str(part.meta["input_error"])
            return chunk({"type": "tool-input-error", **head, "input": part.text(),
                          "errorText": error})  # fmt: skip
        value = part.meta["input"] if "input" in part.meta else _json_or_text(part.text())
        return chunk({"type": "tool-input-available", **head, "input": value})

    def _data(self, part: _Part, *, complete: bool) -> bytes:
        data = {"kind": part.kind, "meta": part.meta, "content": part.text(), "complete": complete}
        return chunk({"type": f"data-{part.kind}", "id": part.id, "data": data})


def _finish_reason(data: Mapping[str, Any]) -> str:
    reason = data.get("finish_reason", data.get("stop_reason"))
    if reason is None:
        return "stop"
    return _FINISH_REASONS.get(str(reason), "other")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
