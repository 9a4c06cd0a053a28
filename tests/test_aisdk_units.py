"""The AI SDK translation without a server (fast tier): events in, UI message chunks out.

(The ``ai`` package itself reads our answers in ``test_ai_sdk.py``.)
"""

from __future__ import annotations

import json
from typing import Any

import gevent

from sse_blueprint import ProducerContext, Stream
from sse_blueprint._transport import WriteWatch, follow
from sse_blueprint.engine import Event
from sse_blueprint.web.aisdk import INTERRUPTED, UIMessageStream


def chunks(data: bytes) -> list[Any]:
    frames = [f for f in data.decode().split("\n\n") if f]
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def events(*raw: tuple[str, dict[str, Any]]) -> list[Event]:
    return [Event(n, name, data) for n, (name, data) in enumerate(raw, start=1)]


def test_a_catch_up_of_every_kind_becomes_whole_parts() -> None:
    ui = UIMessageStream("s1")
    call = {"name": "f", "call_id": "c1", "input": {"a": 1}}
    out = chunks(ui.start() + ui.encode(events(
        ("turnblock_catchup", {"block": 0, "kind": "reasoning", "meta": {}, "content": "Hm",
                               "complete": True}),
        ("turnblock_catchup", {"block": 1, "kind": "tool_call", "meta": call,
                               "content": '{"a": 1}', "complete": True}),
        ("turnblock_catchup", {"block": 2, "kind": "tool_result", "meta": {"call_id": "c1"},
                               "content": "oops", "complete": True}),
        ("turnblock_catchup", {"block": 3, "kind": "chart", "meta": {"x": 1}, "content": "1,2",
                               "complete": False}),
        ("turnblock_catchup", {"block": 4, "kind": "text", "meta": {}, "content": "Hi",
                               "complete": False}),
        ("done", {"stop_reason": "max_tokens"}),
    )))  # fmt: skip
    assert out == [
        {"type": "start", "messageId": "s1"},
        {"type": "reasoning-start", "id": "block-0"},
        {"type": "reasoning-delta", "id": "block-0", "delta": "Hm"},
        {"type": "reasoning-end", "id": "block-0"},
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "f"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"a": 1}'},
        {"type": "tool-input-available", "toolCallId": "c1", "toolName": "f", "input": {"a": 1}},
        {"type": "tool-output-available", "toolCallId": "c1", "output": "oops"},  # not JSON
        {"type": "data-chart", "id": "block-3",
         "data": {"kind": "chart", "meta": {"x": 1}, "content": "1,2", "complete": False}},
        {"type": "text-start", "id": "block-4"},
        {"type": "text-delta", "id": "block-4", "delta": "Hi"},  # not complete: no text-end
        {"type": "finish", "finishReason": "length",
         "messageMetadata": {"stop_reason": "max_tokens"}},
        "[DONE]",
    ]  # fmt: skip


def test_tool_errors_unknown_calls_and_app_events() -> None:
    ui = UIMessageStream("s2")
    out = chunks(ui.encode([
        Event(1, "block_start", {"block": 0, "kind": "tool_call", "meta": {"call_id": "c"}}),
        Event(2, "text_delta", {"block": 0, "text": "{bad"}),
        Event(3, "block_end", {"block": 0, "meta": {"input_error": "not JSON"}}),
        Event(4, "block_start", {"block": 1, "kind": "tool_result",
                                 "meta": {"call_id": "c", "is_error": True}}),
        Event(5, "text_delta", {"block": 1, "text": "it broke"}),
        Event(6, "block_end", {"block": 1, "meta": {}}),
        Event(7, "block_start", {"block": 2, "kind": "tool_result", "meta": {"call_id": "zz"}}),
        Event(8, "block_end", {"block": 2, "meta": {}}),
        Event(9, "status", {"p": 1}, "latest"),
        Event(10, "typing", {}, "ephemeral"),
        Event(11, "usage", {"n": 2}),
        Event(12, "cancelled", {"reason": "user"}),
    ]))  # fmt: skip
    assert out[2] == {"type": "tool-input-error", "toolCallId": "c", "toolName": "tool",
                      "input": "{bad", "errorText": "not JSON"}  # fmt: skip
    assert out[3] == {"type": "tool-output-error", "toolCallId": "c", "errorText": "it broke"}
    assert out[4]["type"] == "data-tool_result"  # a result for a call this answer never showed
    assert out[5] == {"type": "data-status", "data": {"p": 1}, "id": "status"}
    assert out[6] == {"type": "data-typing", "data": {}, "transient": True}
    assert out[7] == {"type": "data-usage", "data": {"n": 2}, "id": "event-11"}
    assert out[8:] == [{"type": "abort", "reason": "user"}, "[DONE]"]


def test_an_answer_cut_short_ends_with_an_error_chunk_not_as_finished() -> None:
    def producer(ctx: ProducerContext) -> None:
        with ctx.block() as block:
            block.write("partial")
            ctx.sleep(5)

    stream = Stream(producer)
    stream.start()
    ui = UIMessageStream(stream.id)
    sub = stream.subscribe(0)
    body = follow(
        sub, 0.5, ui.start(), b": hb\n\n", False, watch=WriteWatch(30), counts={},
        address="a", translate=ui.encode, cut_notice=ui.interrupted(),
    )  # fmt: skip
    out = b""
    with gevent.Timeout(5):
        out += next(body)  # the start, and what there is
        while b"partial" not in out:
            out += next(body)
        stream.release_readers()  # a shutdown hands the reader over to another worker
        out += b"".join(body)
    parts = chunks(out)
    assert parts[-1] == {"type": "error", "errorText": INTERRUPTED}
    assert not [p for p in parts if isinstance(p, dict) and p["type"] == "finish"]
    stream.cancel()
