"""The relays' translators and rules without a network: SDK objects in, blocks and results out.

(End to end, through the SDKs and gunicorn, is ``test_relays.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from sse_blueprint import ProducerContext, Stream
from sse_blueprint._backoff import Backoff
from sse_blueprint.relays import RelayResult
from sse_blueprint.relays._anthropic import _Messages
from sse_blueprint.relays._openai import _ChatCompletions, _Responses
from sse_blueprint.relays._relay import UpstreamFailed, _describe, _retry_after, _retryable
from tests.helpers.sse_parser import Transcript


def translate(make: Callable[[ProducerContext], Any], items: list[Any]) -> tuple[Any, Transcript]:
    """Feed ``items`` to a translator inside a producer; its result and the turn it wrote."""
    results: list[Any] = []

    def producer(ctx: ProducerContext) -> None:
        turn = make(ctx)
        for item in items:
            turn.feed(item)
        results.append(turn.finish())

    stream = Stream(producer)
    sub = stream.subscribe(0)
    stream.start()
    transcript = Transcript()
    with gevent.Timeout(5):
        while not sub.done:
            for ev in sub.poll(1):
                transcript.apply(ev.id, ev.event, ev.data)
    sub.close()
    assert stream.state.value == "done", transcript.events[-1]
    return results[0], transcript


def test_anthropic_reply_goes_back_as_the_api_takes_it() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    raw = [
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "Hmm."}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]  # fmt: skip
    result, turn = translate(_Messages, [adapter.validate_python(r) for r in raw])
    assert result.assistant == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
    ]}  # fmt: skip
    assert [(c.id, c.name, c.input) for c in result.tool_calls] == [("toolu_1", "f", {"a": 1})]
    assert result.reasoning == "Hmm."
    assert dict(result) == {"finish_reason": "tool_use", "model": "claude", "response_id": "msg_1",
                            "usage": {"input_tokens": 3, "output_tokens": 9}}  # fmt: skip
    assert turn.turn[1]["meta"] == {"name": "f", "call_id": "toolu_1", "input": {"a": 1}}


def chunk(**delta: Any) -> Any:
    finish = delta.pop("finish", None)
    return ChatCompletionChunk.model_validate({
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })  # fmt: skip


def test_chat_tool_calls_with_bad_json_and_a_late_id() -> None:
    items = [
        chunk(content="Let me look."),
        chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": '{"a": '}}]),
        chunk(tool_calls=[{"index": 0, "id": "call_real", "function": {"arguments": "oops"}}]),
        chunk(finish="tool_calls"),
    ]
    result, turn = translate(_ChatCompletions, items)
    (call,) = result.tool_calls
    assert (call.id, call.name, call.arguments, call.input) == (
        "call_real",
        "f",
        '{"a": oops',
        None,
    )
    meta = turn.turn[1]["meta"]
    assert meta["call_id"] == "call_real"
    assert meta["input_error"] == "the arguments are not valid JSON"
    function = {"name": "f", "arguments": '{"a": oops'}
    assert result.assistant == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_real", "type": "function", "function": function}
    ]}  # fmt: skip


def test_responses_reply_goes_back_as_input_items() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    response: dict[str, Any] = {
        "id": "r1", "object": "response", "created_at": 1, "model": "m", "output": [],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": "completed",
    }  # fmt: skip
    call = {"type": "function_call", "id": "fc", "call_id": "c9", "name": "g", "arguments": "{}"}
    raw: list[dict[str, Any]] = [
        {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
         "content_index": 0, "delta": "Hi", "logprobs": []},
        {"type": "response.output_item.added", "output_index": 1, "item": call},
        {"type": "response.output_item.done", "output_index": 1, "item": call},  # no deltas
        {"type": "response.incomplete",
         "response": {**response, "incomplete_details": {"reason": "max_output_tokens"}}},
    ]  # fmt: skip
    items = [adapter.validate_python({"sequence_number": n, **r}) for n, r in enumerate(raw)]
    result, turn = translate(_Responses, items)
    assert result.finish_reason == "length"
    assert result.assistant == [
        {"role": "assistant", "content": "Hi"},
        {"type": "function_call", "call_id": "c9", "name": "g", "arguments": "{}"},
    ]
    assert turn.turn[1]["content"] == "{}"  # sent whole by a server that streams no deltas


class _StatusError(Exception):
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        self.status_code = status
        self.response = type("R", (), {"headers": {"retry-after": retry_after} if retry_after
                                       else {}})()  # fmt: skip


def test_errors_are_described_by_status_and_retried_only_when_transient() -> None:
    assert _describe(_StatusError(429), False, 60) == (
        "the model provider is rate limiting (HTTP 429)"
    )
    assert _describe(_StatusError(502), False, 60) == "the model provider failed (HTTP 502)"
    assert _describe(TimeoutError(), True, 7.5) == (
        "the model provider stalled (no data for 7.5 s)"
    )
    assert _describe(TimeoutError(), False, 30) == ("the model provider did not answer within 30 s")
    assert _describe(UpstreamFailed("bad code with spaces"), True, 60) == (
        "the model provider's stream failed"  # only a short identifier is named
    )
    assert [_retryable(_StatusError(s)) for s in (400, 401, 404, 408, 429, 500, 503)] == [
        False, False, False, True, True, True, True,
    ]  # fmt: skip


def test_backoff_grows_with_jitter_is_capped_and_resets() -> None:
    backoff = Backoff(0.5, 8.0, jitter=True)
    delays = [backoff.delay() for _ in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert 2.0 <= delays[3] <= 4.0
    assert all(d <= 8.0 for d in delays)
    assert backoff.peek() == 8.0
    backoff.reset()
    assert backoff.peek() == 0.5
    plain = Backoff(0.1, 0.3)
    assert [plain.delay() for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]


def test_a_short_retry_after_is_honoured() -> None:
    assert _retry_after(_StatusError(429, "5")) == 5.0
    assert _retry_after(_StatusError(429, "3600")) == 30.0  # a long one is not waited out
    assert _retry_after(_StatusError(429, "soon")) == 0.0
    assert _retry_after(_StatusError(503)) == 0.0


def test_a_result_is_the_done_data() -> None:
    result = RelayResult(finish_reason="stop", usage={"total_tokens": 3}, model="m")
    assert dict(result) == {"finish_reason": "stop", "usage": {"total_tokens": 3}, "model": "m"}
    assert "response_id" not in result


@pytest.mark.parametrize("retries", [-1])
def test_negative_retries_are_refused(retries: int) -> None:
    from sse_blueprint.relays import relay_chat_completions

    def producer(ctx: ProducerContext) -> None:
        with pytest.raises(ValueError, match="retries"):
            relay_chat_completions(ctx, _Client(), retries=retries, model="m", messages=[])

    stream = Stream(producer)
    stream.start()
    stream.wait(5)
    assert stream.state.value == "done"


class _Client:
    def with_options(self, **_: Any) -> _Client:
        return self
