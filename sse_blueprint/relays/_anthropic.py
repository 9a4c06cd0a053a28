"""Anthropic's Messages API as a producer, read through the official ``anthropic`` SDK.

Each ``content_block_start`` … ``content_block_stop`` is one block: ``text`` → ``text``,
``thinking`` → ``reasoning`` (its ``signature`` in the end meta, so the block can be sent back in
a tool loop), ``redacted_thinking`` → ``reasoning`` with meta ``redacted`` and its ``data``,
``tool_use`` / ``server_tool_use`` → ``tool_call`` (the ``input_json_delta`` text as streamed, the
parsed ``input`` at its end), a server tool's ``*_tool_result`` → ``tool_result``. Citations are
durable ``citation`` events. ``message_delta``'s ``stop_reason`` and the usage of ``message_start``
and ``message_delta`` → the ``done`` data; an ``error`` frame fails the stream.

Imports the relay loop and the engine's producer API; the SDK only as the caller's client.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine import ProducerContext
from ._openai import DEFAULT_RETRIES, DEFAULT_STALL_TIMEOUT, dump
from ._relay import Blocks, RelayResult, ToolCall, UpstreamFailed, parse_arguments, relay

__all__ = ["relay_messages"]


def relay_messages(
    ctx: ProducerContext,
    client: Any,
    *,
    retries: int = DEFAULT_RETRIES,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    **params: Any,
) -> RelayResult:
    """Stream ``client.messages.create(**params)`` into the producer's turn.

    ``client`` is an ``anthropic.Anthropic``; ``stream=True`` is added. Retries and stalls as
    :func:`~sse_blueprint.relays.relay_chat_completions`. For a tool loop, append
    ``result.assistant`` (the reply's content blocks, thinking signatures included) and a user
    message with your ``tool_result`` blocks, and call again.
    """
    create = _messages_create
    return relay(ctx, client, create, params, _Messages, retries=retries,
                 stall_timeout=stall_timeout)  # fmt: skip


def _messages_create(client: Any) -> Any:
    return client.messages.create


_TOOL_USES = ("tool_use", "server_tool_use", "mcp_tool_use")


class _Messages:
    api = "messages"

    def __init__(self, ctx: ProducerContext) -> None:
        self.ctx = ctx
        self.blocks = Blocks(ctx)
        self.result = RelayResult()
        self.content: dict[int, dict[str, Any]] = {}  # the reply's blocks as the API takes them
        self.parts: dict[int, list[str]] = {}
        self.stopped = False

    def feed(self, event: Any) -> None:
        kind = getattr(event, "type", "")
        if kind == "message_start":
            message = event.message
            self.result.id, self.result.model = message.id, message.model
            if getattr(message, "usage", None) is not None:
                self.result.usage = dump(message.usage)
        elif kind == "content_block_start":
            self._start(event.index, event.content_block)
        elif kind == "content_block_delta":
            self._delta(event.index, event.delta)
        elif kind == "content_block_stop":
            self._stop(event.index)
        elif kind == "message_delta":
            reason = getattr(event.delta, "stop_reason", None)
            self.result.finish_reason = reason or self.result.finish_reason
            if getattr(event, "usage", None) is not None:
                usage = {k: v for k, v in dump(event.usage).items() if v is not None}
                self.result.usage = {**self.result.usage, **usage}
        elif kind == "message_stop":
            self.stopped = True

    def _start(self, index: int, block: Any) -> None:
        blocks, kind = self.blocks, block.type
        self.content[index] = dump(block)  # as sent back in a tool loop; filled in at its stop
        self.parts[index] = []
        if kind == "text":
            blocks.start(index, "text")
            self._text(index, "text", getattr(block, "text", ""))
        elif kind == "thinking":
            blocks.start(index, "reasoning")
            self._text(index, "thinking", getattr(block, "thinking", ""))
        elif kind == "redacted_thinking":
            blocks.start(index, "reasoning", {"redacted": True, "data": block.data})
        elif kind in _TOOL_USES:
            meta = {"name": block.name, "call_id": block.id}
            blocks.start(index, "tool_call", meta | ({"provider_executed": True}
                                                     if kind != "tool_use" else {}))  # fmt: skip
        elif kind.endswith("_tool_result"):
            data = self.content[index]
            with self.ctx.block("tool_result", {"call_id": data.get("tool_use_id")}) as result:
                result.write(json.dumps(data.get("content"), ensure_ascii=False))
            self.blocks.started = True

    def _text(self, index: int, field: str, text: str) -> None:
        if text:
            self.parts[index].append(text)
            self.blocks.write(index, "text" if field == "text" else "reasoning", text)

    def _delta(self, index: int, delta: Any) -> None:
        kind = delta.type
        if kind == "text_delta":
            self._text(index, "text", delta.text)
        elif kind == "thinking_delta":
            self._text(index, "thinking", delta.thinking)
        elif kind == "signature_delta":
            self.content.setdefault(index, {})["signature"] = delta.signature
        elif kind == "input_json_delta" and delta.partial_json:
            self.parts.setdefault(index, []).append(delta.partial_json)
            self.blocks.write(index, "tool_call", delta.partial_json)
        elif kind == "citations_delta":
            block = self.blocks.open.get(index)
            citation = dump(delta.citation)
            self.content.setdefault(index, {}).setdefault("citations", []).append(citation)
            self.ctx.send("citation", {"block": block.index if block else None, **citation})

    def _stop(self, index: int) -> None:
        content = self.content.get(index, {})
        text = "".join(self.parts.get(index, ()))
        kind = content.get("type")
        if kind in _TOOL_USES:
            value, meta = parse_arguments(text)
            content["input"] = value if value is not None else {}
            call = ToolCall(content["id"], content["name"], text, value)
            if kind == "tool_use":  # the app runs it; a server tool ran at the provider
                self.result.tool_calls.append(call)
            self.blocks.end(index, meta)
        elif kind == "thinking":
            content["thinking"] = text
            self.blocks.end(index, {"signature": content.get("signature")})
        else:
            if kind == "text":
                content["text"] = text
            self.blocks.end(index)

    def finish(self) -> RelayResult:
        result = self.result
        if not self.stopped:
            raise UpstreamFailed("stream_ended_early")
        self.blocks.finish(result)
        result.assistant = {
            "role": "assistant",
            "content": [self.content[i] for i in sorted(self.content)],
        }
        return result
