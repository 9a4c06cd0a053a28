"""Relays end to end: a local upstream speaking the providers' wire formats, read by the official
``openai`` and ``anthropic`` SDKs inside a gunicorn gevent worker, into a stream a client reads.

What the stream's turn and ``done`` data hold must equal what the upstream sent; a cancel or a
stream timeout closes the upstream connection; failures before the first token are retried, after
it they end the stream with a safe message; the test key appears in no event and no log line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, read_stream, start_stream, wait_done
from tests.helpers.upstream import (
    CHAT_DONE,
    SECRET_KEY,
    Fail,
    Frames,
    Upstream,
    anthropic_error,
    anthropic_event,
    chat_chunk,
    chat_delta,
    chat_error,
    responses_event,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def relay_server(server_factory: Any, upstream: Upstream) -> Iterator[LiveServer]:
    server: LiveServer = server_factory(
        {"RELAY_UPSTREAM": upstream.url, "SSE_HEARTBEAT_INTERVAL": 0.5},
        app="tests.helpers.relay_app:app",
    )
    yield server
    assert SECRET_KEY not in server.log(), "the API key reached the server log"


def relay(server: LiveServer, producer: str, model: str, **input: Any) -> dict[str, Any]:
    """Run a relay to its end; the turn, the app events, the terminal event and the raw bytes."""
    stream_id = start_stream(server.url, producer, model=model, **input)
    result = read_stream(server.url, stream_id)
    assert SECRET_KEY.encode() not in result.raw, "the API key reached a client"
    terminal = result.events[-1]
    return {
        "id": stream_id,
        "turn": [result.transcript.turn[i] for i in sorted(result.transcript.turn)],
        "events": [(name, data) for _, name, data in result.transcript.app_events],
        "end": terminal.type,
        "data": terminal.json(),
    }


def block(kind: str, content: str, meta: dict[str, Any] | None = None, complete: bool = True):
    return {"kind": kind, "meta": meta or {}, "content": content, "complete": complete}


def ok_chat(text: str = "Hi there") -> Frames:
    return Frames([chat_delta(role="assistant", content=""), chat_delta(content=text),
                   chat_delta(finish_reason="stop"), CHAT_DONE])  # fmt: skip


# -- OpenAI Chat Completions -----------------------------------------------------------------


def test_chat_completions_turn_equals_what_the_upstream_sent(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    tool = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    upstream.script("chat-full", Frames([
        chat_delta(role="assistant", content=""),
        chat_delta(reasoning_content="Let me "),
        chat_delta(reasoning_content="think."),
        chat_delta(content="Checking "),
        chat_delta(content="the weather."),
        chat_delta(tool_calls=[tool]),
        chat_delta(tool_calls=[{"index": 0, "function": {"arguments": '{"ci'}}]),
        chat_delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]),
        chat_delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "get_time", "arguments": "{}"}}]),
        chat_delta(finish_reason="tool_calls"),
        chat_chunk([], usage=usage),
        CHAT_DONE,
    ], interval=0.01))  # fmt: skip
    got = relay(relay_server, "relay_chat", "chat-full")
    assert got["end"] == "done"
    assert got["turn"] == [
        block("reasoning", "Let me think."),
        block("text", "Checking the weather."),
        block("tool_call", '{"city": "Paris"}',
              {"name": "get_weather", "call_id": "call_a", "input": {"city": "Paris"}}),
        block("tool_call", "{}", {"name": "get_time", "call_id": "call_b", "input": {}}),
    ]  # fmt: skip
    assert got["data"]["finish_reason"] == "tool_calls"
    assert got["data"]["usage"] == usage
    assert got["data"]["model"] == "m"
    (request,) = upstream.requests_for("chat-full")
    assert request.path == "/v1/chat/completions"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"


def test_reasoning_field_of_compatible_servers_is_a_reasoning_block(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    # Ollama, OpenRouter and newer vLLM name it "reasoning", not "reasoning_content".
    upstream.script("chat-ollama", Frames([
        chat_delta(role="assistant", reasoning="Hmm."), chat_delta(content="Yes."),
        chat_delta(finish_reason="stop"), CHAT_DONE,
    ]))  # fmt: skip
    got = relay(relay_server, "relay_chat", "chat-ollama")
    assert got["turn"] == [block("reasoning", "Hmm."), block("text", "Yes.")]
    assert got["data"]["finish_reason"] == "stop"


def test_failures_before_the_first_token_are_retried(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    # A 503, a 429 (Retry-After 0) and a stream that fails before any token: three retries.
    upstream.script(
        "chat-flaky",
        Fail(503),
        Fail(429, headers={"Retry-After": "0"}),
        Frames([chat_delta(role="assistant", content=""), chat_error()]),
        ok_chat("Third time lucky."),
    )
    got = relay(relay_server, "relay_chat", "chat-flaky", retries=3)
    assert got["end"] == "done"
    assert got["turn"] == [block("text", "Third time lucky.")]
    assert len(upstream.requests_for("chat-flaky")) == 4


@pytest.mark.parametrize(
    ("status", "retries", "attempts", "message"),
    [
        (503, 1, 2, "the model provider failed (HTTP 503)"),
        (401, 3, 1, "the model provider refused the credentials (HTTP 401)"),
        (400, 3, 1, "the model provider refused the request (HTTP 400)"),
    ],
)
def test_a_failing_upstream_ends_the_stream_with_a_safe_error(
    relay_server: LiveServer, upstream: Upstream, status: int, retries: int, attempts: int,
    message: str,
) -> None:  # fmt: skip
    model = f"chat-down-{status}"
    upstream.script(model, Fail(status))
    got = relay(relay_server, "relay_chat", model, retries=retries)
    assert got["end"] == "error"
    assert got["data"]["message"] == message
    assert got["turn"] == []
    assert len(upstream.requests_for(model)) == attempts  # client errors are not retried


def test_a_failure_after_the_first_token_is_not_retried(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    upstream.script("chat-breaks", Frames([chat_delta(content="Hel"), chat_error()]), ok_chat())
    got = relay(relay_server, "relay_chat", "chat-breaks")
    assert got["end"] == "error"
    assert got["data"]["message"] == "the model provider's stream failed (server_error)"
    assert got["turn"] == [block("text", "Hel", complete=False)]  # what was said stays said
    assert len(upstream.requests_for("chat-breaks")) == 1


def test_a_stream_that_ends_without_a_finish_reason_is_an_error(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    upstream.script("chat-truncated", Frames([chat_delta(content="Hel")]))
    got = relay(relay_server, "relay_chat", "chat-truncated")
    assert got["end"] == "error"
    assert got["data"]["message"] == "the model provider's stream failed (stream_ended_early)"


def test_a_stall_after_the_first_token_ends_the_stream_and_hangs_up(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    frames = [chat_delta(content="Hi"), chat_delta(content=" there"), chat_delta("stop")]
    upstream.script("chat-stalls", Frames(frames, stall_after=1))
    got = relay(relay_server, "relay_chat", "chat-stalls", stall_timeout=1)
    assert got["end"] == "error"
    assert got["data"]["message"] == "the model provider stalled (no data for 1 s)"
    assert got["turn"] == [block("text", "Hi", complete=False)]
    (request,) = upstream.requests_for("chat-stalls")
    deadline = time.monotonic() + 5
    while request.hung_up_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert request.hung_up_at is not None


def _wait_for_request(upstream: Upstream, model: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = upstream.requests_for(model)
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no request for {model}")


def _hung_up_within(request: Any, since: float, seconds: float) -> float:
    deadline = since + 5
    while request.hung_up_at is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert request.hung_up_at is not None, "the upstream connection stayed open"
    return float(request.hung_up_at - since)


def test_cancel_closes_the_upstream_connection_at_once(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    words = [chat_delta(content=f"word{n} ") for n in range(400)]
    upstream.script("chat-long", Frames([*words, chat_delta("stop"), CHAT_DONE], interval=0.025))
    stream_id = start_stream(relay_server.url, "relay_chat", model="chat-long")
    request = _wait_for_request(upstream, "chat-long")
    time.sleep(0.3)  # some words are out
    cancelled_at = time.monotonic()
    response = httpx.post(f"{relay_server.url}/api/streams/{stream_id}/cancel", json={})
    assert response.status_code == 202
    # The provider stops generating (and billing) when its connection closes: seen here.
    assert _hung_up_within(request, cancelled_at, 1.0) < 1.0
    status = wait_done(relay_server.url, stream_id)
    assert status["state"] == "cancelled"
    got = read_stream(relay_server.url, stream_id)
    assert got.events[-1].type == "cancelled"
    text = got.transcript.turn[0]["content"]
    assert text.startswith("word0 ")
    assert len(text.split()) < 400


def test_the_stream_timeout_closes_the_upstream_connection(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    words = [chat_delta(content=f"w{n} ") for n in range(400)]
    upstream.script("chat-slow", Frames([*words, chat_delta("stop"), CHAT_DONE], interval=0.025))
    stream_id = start_stream(relay_server.url, "relay_chat_brief", model="chat-slow")
    request = _wait_for_request(upstream, "chat-slow")
    status = wait_done(relay_server.url, stream_id)
    assert status["state"] == "error"
    ended_at = time.monotonic()
    assert _hung_up_within(request, ended_at, 1.0) < 1.0


# -- OpenAI Responses ----------------------------------------------------------------------


def _response(status: str, **fields: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "output": [],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": status,
            **fields}  # fmt: skip


def _events(*raw: dict[str, Any]) -> list[bytes]:
    return [responses_event({"sequence_number": n, **r}) for n, r in enumerate(raw)]


def test_responses_turn_equals_what_the_upstream_sent(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    usage = {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14,
             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 4}}  # fmt: skip
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
            "arguments": ""}  # fmt: skip
    upstream.script("resp-full", Frames(_events(
        {"type": "response.created", "response": _response("in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "reasoning", "id": "rs_1", "summary": []}},
        {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
         "summary_index": 0, "delta": "First."},
        {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
         "summary_index": 1, "delta": "Second."},
        {"type": "response.output_item.done", "output_index": 0,
         "item": {"type": "reasoning", "id": "rs_1", "summary": []}},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress",
                  "content": []}},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1,
         "content_index": 0, "delta": "It is ", "logprobs": []},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 1,
         "content_index": 0, "delta": "sunny.", "logprobs": []},
        {"type": "response.output_item.done", "output_index": 1,
         "item": {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                  "content": []}},
        {"type": "response.output_item.added", "output_index": 2, "item": call},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2,
         "delta": '{"city":'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 2,
         "delta": ' "Oslo"}'},
        {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 2,
         "arguments": '{"city": "Oslo"}'},
        {"type": "response.output_item.done", "output_index": 2,
         "item": {**call, "arguments": '{"city": "Oslo"}'}},
        {"type": "response.completed", "response": _response("completed", usage=usage)},
    ), interval=0.01))  # fmt: skip
    got = relay(relay_server, "relay_responses", "resp-full")
    assert got["end"] == "done"
    assert got["turn"] == [
        block("reasoning", "First.\n\nSecond."),
        block("text", "It is sunny."),
        block("tool_call", '{"city": "Oslo"}',
              {"name": "get_weather", "call_id": "call_1", "input": {"city": "Oslo"}}),
    ]  # fmt: skip
    assert got["data"]["usage"] == usage
    assert got["data"]["finish_reason"] == "tool_calls"
    assert got["data"]["response_id"] == "resp_1"
    assert upstream.requests_for("resp-full")[0].path == "/v1/responses"


def test_responses_failed_mid_stream_is_an_error(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    failed = _response("failed", error={"code": "server_error", "message": f"x {SECRET_KEY}"})
    upstream.script("resp-fails", Frames(_events(
        {"type": "response.created", "response": _response("in_progress")},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "Par", "logprobs": []},
        {"type": "response.failed", "response": failed},
    )))  # fmt: skip
    got = relay(relay_server, "relay_responses", "resp-fails")
    assert got["end"] == "error"
    assert got["data"]["message"] == "the model provider's stream failed (server_error)"
    assert got["turn"] == [block("text", "Par", complete=False)]


# -- Anthropic Messages --------------------------------------------------------------------


def _anthropic(*raw: dict[str, Any]) -> list[bytes]:
    return [anthropic_event(r) for r in raw]


_MESSAGE_START = {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
    "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1},
}}  # fmt: skip


def test_messages_turn_equals_what_the_upstream_sent(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    def delta(index: int, **d: Any) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": d}

    upstream.script("claude-full", Frames(_anthropic(
        _MESSAGE_START,
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        delta(0, type="thinking_delta", thinking="The user wants "),
        delta(0, type="thinking_delta", thinking="the weather."),
        delta(0, type="signature_delta", signature="sig-123"),
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "text", "text": ""}},
        delta(1, type="text_delta", text="Let me "),
        delta(1, type="text_delta", text="check."),
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                           "input": {}}},
        delta(2, type="input_json_delta", partial_json=""),
        delta(2, type="input_json_delta", partial_json='{"city": '),
        delta(2, type="input_json_delta", partial_json='"Rome"}'),
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 42}},
        {"type": "message_stop"},
    ), interval=0.01))  # fmt: skip
    got = relay(relay_server, "relay_messages", "claude-full")
    assert got["end"] == "done"
    assert got["turn"] == [
        block("reasoning", "The user wants the weather.", {"signature": "sig-123"}),
        block("text", "Let me check."),
        block("tool_call", '{"city": "Rome"}',
              {"name": "get_weather", "call_id": "toolu_1", "input": {"city": "Rome"}}),
    ]  # fmt: skip
    assert got["data"]["finish_reason"] == "tool_use"
    assert got["data"]["usage"]["input_tokens"] == 10
    assert got["data"]["usage"]["output_tokens"] == 42
    assert got["data"]["model"] == "claude-test"
    (request,) = upstream.requests_for("claude-full")
    assert request.path == "/v1/messages"
    # (the SDK sends the key as x-api-key or, in newer releases, as a bearer token)
    assert SECRET_KEY in request.headers.get("x-api-key", "") + request.headers.get(
        "authorization", ""
    )


def test_messages_overloaded_before_the_first_token_is_retried(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    ok = _anthropic(
        _MESSAGE_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    )  # fmt: skip
    upstream.script(
        "claude-busy",
        Frames([anthropic_event(_MESSAGE_START), anthropic_error("overloaded_error")]),
        Frames(ok),
    )
    got = relay(relay_server, "relay_messages", "claude-busy")
    assert got["end"] == "done"
    assert got["turn"] == [block("text", "Hi")]
    assert got["data"]["finish_reason"] == "end_turn"
    assert len(upstream.requests_for("claude-busy")) == 2


def test_messages_error_after_the_first_token_names_only_its_type(
    relay_server: LiveServer, upstream: Upstream
) -> None:
    upstream.script("claude-breaks", Frames([
        *_anthropic(
            _MESSAGE_START,
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        anthropic_error("overloaded_error"),
    ]))  # fmt: skip
    got = relay(relay_server, "relay_messages", "claude-breaks")
    assert got["end"] == "error"
    assert got["data"]["message"] == "the model provider's stream failed (overloaded_error)"
    assert got["turn"] == [block("text", "Hi", complete=False)]


def test_cancel_on_another_instance_closes_the_upstream_connection(
    server_factory: Any, upstream: Upstream, redis_server: Any, postgres: Any
) -> None:
    from tests.test_redis import shared_config

    config = {**shared_config(redis_server, postgres), "RELAY_UPSTREAM": upstream.url}
    owner = server_factory(config, app="tests.helpers.relay_app:app")
    other = server_factory(config, app="tests.helpers.relay_app:app")
    words = [chat_delta(content=f"token{n} ") for n in range(400)]
    upstream.script("chat-shared", Frames([*words, chat_delta("stop"), CHAT_DONE], interval=0.025))
    stream_id = start_stream(owner.url, "relay_chat", model="chat-shared")
    request = _wait_for_request(upstream, "chat-shared")
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    response = httpx.post(f"{other.url}/api/streams/{stream_id}/cancel", json={})
    assert response.status_code == 202
    assert _hung_up_within(request, cancelled_at, 1.0) < 1.0
    assert wait_done(owner.url, stream_id)["state"] == "cancelled"
