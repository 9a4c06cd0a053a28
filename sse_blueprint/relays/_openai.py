"""OpenAI's two streaming APIs as producers: Chat Completions (and every server that speaks it:
vLLM, Ollama, LiteLLM, llama.cpp, ...) and Responses, read through the official ``openai`` SDK.

Chat Completions: ``delta.content`` → a ``text`` block; ``reasoning_content`` or ``reasoning``
deltas (as OpenAI-compatible servers send them) → a ``reasoning`` block; each
``delta.tool_calls[i]`` → a ``tool_call`` block (meta ``name``, ``call_id``; the argument text as
streamed; its end carries the parsed ``input``); ``finish_reason`` and ``usage`` → the ``done``
data. Responses: output text, refusal, reasoning (summary or text) and function call items the
same way; ``response.completed`` / ``response.incomplete`` end it, ``response.failed`` and
``error`` fail it.

Imports the relay loop and the engine's producer API; the SDK only as the caller's client.
"""

from __future__ import annotations

from typing import Any

from ..engine import ProducerContext
from ._relay import Blocks, RelayResult, ToolCall, UpstreamFailed, parse_arguments, relay

__all__ = ["relay_chat_completions", "relay_responses"]

DEFAULT_RETRIES = 2
DEFAULT_STALL_TIMEOUT = 60.0


def relay_chat_completions(
    ctx: ProducerContext,
    client: Any,
    *,
    retries: int = DEFAULT_RETRIES,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    **params: Any,
) -> RelayResult:
    """Stream ``client.chat.completions.create(**params)`` into the producer's turn.

    ``client`` is an ``openai.OpenAI`` (any ``base_url``). ``stream=True`` is added, and
    ``stream_options={"include_usage": True}`` unless you pass ``stream_options`` (``None``
    leaves it out, for servers that refuse it). The SDK's own retries are turned off: an
    upstream that fails before the first token is tried ``retries`` more times with backoff and
    jitter; one that sends nothing for ``stall_timeout`` seconds is given up. Returns the
    :class:`RelayResult` (a mapping: the ``done`` data).
    """
    params.setdefault("stream_options", {"include_usage": True})
    if params["stream_options"] is None:
        del params["stream_options"]
    create = _chat_create
    return relay(ctx, client, create, params, _ChatCompletions, retries=retries,
                 stall_timeout=stall_timeout)  # fmt: skip


def relay_responses(
    ctx: ProducerContext,
    client: Any,
    *,
    retries: int = DEFAULT_RETRIES,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    **params: Any,
) -> RelayResult:
    """Stream ``client.responses.create(**params)`` (the Responses API) into the turn.

    Retries and stalls as :func:`relay_chat_completions`. For a tool loop, extend ``input``
    with ``result.assistant`` (the output items) and your ``function_call_output`` items, or
    pass ``previous_response_id=result.id``.
    """
    create = _responses_create
    return relay(ctx, client, create, params, _Responses, retries=retries,
                 stall_timeout=stall_timeout)  # fmt: skip


def _chat_create(client: Any) -> Any:
    return client.chat.completions.create


def _responses_create(client: Any) -> Any:
    return client.responses.create


def dump(value: Any) -> dict[str, Any]:
    """An SDK object (pydantic) as plain JSON data."""
    if hasattr(value, "model_dump"):
        data: dict[str, Any] = value.model_dump(mode="json", exclude_none=True)
        return data
    return dict(value)


class _ChatCompletions:
    api = "chat.completions"

    def __init__(self, ctx: ProducerContext) -> None:
        self.blocks = Blocks(ctx)
        self.result = RelayResult()
        self.calls: dict[int, ToolCall] = {}
        self.args: dict[int, list[str]] = {}

    def feed(self, chunk: Any) -> None:
        result = self.result
        result.id = result.id or getattr(chunk, "id", None) or None
        result.model = getattr(chunk, "model", None) or result.model
        if getattr(chunk, "usage", None) is not None:
            result.usage = dump(chunk.usage)
        for choice in getattr(chunk, "choices", None) or ():
            if choice.index != 0:
                continue  # n > 1: the turn is the first choice
            if choice.delta is not None:
                self._delta(choice.delta)
            if choice.finish_reason:
                result.finish_reason = choice.finish_reason

    def _delta(self, delta: Any) -> None:
        blocks = self.blocks
        extra = getattr(delta, "model_extra", None) or {}
        thought = (
            getattr(delta, "reasoning_content", None)
            or getattr(delta, "reasoning", None)
            or extra.get("reasoning_content")
            or extra.get("reasoning")
        )
        if isinstance(thought, str):
            blocks.write("reasoning", "reasoning", thought)
        if delta.content:
            blocks.end("reasoning")  # the answer has begun
            blocks.write("text", "text", delta.content)
        if getattr(delta, "refusal", None):
            blocks.end("reasoning")
            if "refusal" not in blocks.open:
                blocks.start("refusal", "text", {"refusal": True})
            blocks.write("refusal", "text", delta.refusal)
        for part in delta.tool_calls or ():
            self._tool_call(part)

    def _tool_call(self, part: Any) -> None:
        blocks = self.blocks
        function = part.function
        call = self.calls.get(part.index)
        if call is None:
            blocks.end("reasoning")
            name = (function.name if function is not None else None) or ""
            call = self.calls[part.index] = ToolCall(part.id or f"call_{part.index}", name, "")
            self.args[part.index] = []
            blocks.start(("tool", part.index), "tool_call", {"name": name, "call_id": call.id})
        elif part.id and call.id == f"call_{part.index}" and part.id != call.id:
            call.id = part.id  # a server that names the call after its first delta
        arguments = function.arguments if function is not None else None
        if arguments:
            self.args[part.index].append(arguments)
            blocks.write(("tool", part.index), "tool_call", arguments)

    def finish(self) -> RelayResult:
        result, blocks = self.result, self.blocks
        if result.finish_reason is None:
            raise UpstreamFailed("stream_ended_early")
        for index in sorted(self.calls):
            call = self.calls[index]
            call.arguments = "".join(self.args[index])
            call.input, meta = parse_arguments(call.arguments)
            blocks.end(("tool", index), {**meta, "call_id": call.id, "name": call.name})
            result.tool_calls.append(call)
        blocks.finish(result)
        message: dict[str, Any] = {"role": "assistant", "content": result.text or None}
        if result.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in result.tool_calls
            ]  # fmt: skip
        result.assistant = message
        return result


_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


class _Responses:
    api = "responses"

    def __init__(self, ctx: ProducerContext) -> None:
        self.blocks = Blocks(ctx)
        self.result = RelayResult()
        self.calls: dict[int, ToolCall] = {}
        self.streamed: set[int] = set()  # function calls whose arguments came as deltas
        self.summary: dict[int, int] = {}  # the reasoning summary part each item is in
        self.ended = False

    def feed(self, event: Any) -> None:
        kind = getattr(event, "type", "")
        blocks = self.blocks
        if kind in ("response.created", "response.in_progress"):
            self.result.id = event.response.id
            self.result.model = event.response.model
        elif kind == "response.output_item.added":
            item = event.item
            if item.type == "function_call":
                index = event.output_index
                self.calls[index] = ToolCall(item.call_id, item.name, "")
                blocks.start(index, "tool_call", {"name": item.name, "call_id": item.call_id})
        elif kind == "response.output_text.delta":
            blocks.write(("text", event.output_index), "text", event.delta)
        elif kind == "response.refusal.delta":
            key = ("refusal", event.output_index)
            if key not in blocks.open:
                blocks.start(key, "text", {"refusal": True})
            blocks.write(key, "text", event.delta)
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            self._reasoning(event)
        elif kind == "response.function_call_arguments.delta":
            self.streamed.add(event.output_index)
            blocks.write(event.output_index, "tool_call", event.delta)
        elif kind == "response.output_item.done":
            self._item_done(event.output_index, event.item)
        elif kind in ("response.completed", "response.incomplete"):
            self._completed(event.response)
        elif kind == "response.failed":
            error = getattr(event.response, "error", None)
            raise UpstreamFailed(getattr(error, "code", None))
        elif kind == "error":
            raise UpstreamFailed(getattr(event, "code", None))

    def _reasoning(self, event: Any) -> None:
        index = event.output_index
        key = ("reasoning", index)
        part = getattr(event, "summary_index", None)
        if part is not None:
            if key in self.blocks.open and self.summary.get(index) != part:
                self.blocks.write(key, "reasoning", "\n\n")  # the summary's next paragraph
            self.summary[index] = part
        self.blocks.write(key, "reasoning", event.delta)

    def _item_done(self, index: int, item: Any) -> None:
        blocks = self.blocks
        call = self.calls.get(index)
        if call is None:
            for key in (("text", index), ("refusal", index), ("reasoning", index)):
                blocks.end(key)
            return
        call.arguments = item.arguments or ""
        if index not in self.streamed:
            blocks.write(index, "tool_call", call.arguments)  # a server that sent it whole
        call.input, meta = parse_arguments(call.arguments)
        blocks.end(index, meta)
        self.result.tool_calls.append(call)

    def _completed(self, response: Any) -> None:
        result = self.result
        self.ended = True
        result.id, result.model = response.id, response.model
        if getattr(response, "usage", None) is not None:
            result.usage = dump(response.usage)
        details = getattr(response, "incomplete_details", None)
        if details is not None and getattr(details, "reason", None):
            result.finish_reason = _FINISH.get(details.reason, details.reason)
        else:
            result.finish_reason = "tool_calls" if self.calls else "stop"

    def finish(self) -> RelayResult:
        result, blocks = self.result, self.blocks
        if not self.ended:
            raise UpstreamFailed("stream_ended_early")
        blocks.finish(result)
        items: list[dict[str, Any]] = []
        if result.text:
            items.append({"role": "assistant", "content": result.text})
        items += [
            {"type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments}
            for c in result.tool_calls
        ]
        result.assistant = items
        return result
