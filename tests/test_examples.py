"""The README's model examples, run as they are, and the reference app with a real model.

``docs/examples/*.py`` are shown verbatim in the README ("Use with OpenAI / Anthropic / any
OpenAI-compatible server", "Use with the AI SDK"); here each is served by gunicorn with the
SDK's usual environment variables aimed at the loopback upstream of :mod:`tests.helpers.upstream`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, LiveServer, npm_folder, read_stream, start_stream, wait_done
from tests.helpers.upstream import (
    CHAT_DONE,
    SECRET_KEY,
    Frames,
    Upstream,
    anthropic_event,
    chat_chunk,
    chat_delta,
)
from tests.test_ai_sdk import SCRIPT, node

EXAMPLES = ROOT / "docs/examples"
pytestmark = pytest.mark.timeout(180)


def serve(
    server_factory: Any, upstream: Upstream, app: str, *, openai: bool = True, **config: Any
) -> LiveServer:
    env = {
        "PYTHONPATH": str(EXAMPLES),
        "ANTHROPIC_BASE_URL": upstream.url,
        "ANTHROPIC_API_KEY": SECRET_KEY,
    }
    if openai:
        env |= {"OPENAI_BASE_URL": f"{upstream.url}/v1", "OPENAI_API_KEY": SECRET_KEY}
    server: LiveServer = server_factory(
        config, app=app, env=env, ready=("/api/streams/none/status", 404)
    )
    return server


def turn_of(server: LiveServer, stream_id: str) -> tuple[list[dict[str, Any]], Any]:
    got = read_stream(server.url, stream_id)
    assert SECRET_KEY.encode() not in got.raw
    return [got.transcript.turn[i] for i in sorted(got.transcript.turn)], got.events[-1]


def text_frames(*pieces: str, interval: float = 0.0) -> Frames:
    return Frames([chat_delta(role="assistant", content=""),
                   *[chat_delta(content=p) for p in pieces],
                   chat_delta(finish_reason="stop"),
                   chat_chunk([], usage={"prompt_tokens": 3, "completion_tokens": len(pieces),
                                         "total_tokens": 3 + len(pieces)}),
                   CHAT_DONE], interval=interval)  # fmt: skip


@pytest.mark.parametrize("name", ["openai_chat.py", "anthropic_chat.py", "ai_sdk_chat.py"])
def test_the_readme_shows_each_example_as_it_is(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    code = (EXAMPLES / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert code in blocks, f"README does not show docs/examples/{name} verbatim"


def test_openai_example_relays_a_chat_and_runs_a_tool_loop(
    server_factory: Any, upstream: Upstream
) -> None:
    server = serve(server_factory, upstream, "openai_chat:app")
    hello = [{"role": "user", "content": "Hi!"}]
    upstream.script("gpt-4o-mini", text_frames("Hello", ", you."))
    turn, end = turn_of(server, start_stream(server.url, "chat", messages=hello))
    assert end.type == "done"
    assert end.json()["usage"]["completion_tokens"] == 2
    assert [(b["kind"], b["content"]) for b in turn] == [("text", "Hello, you.")]

    call = {"index": 0, "id": "call_w", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    upstream.script(
        "gpt-4o-mini",
        Frames([chat_delta(tool_calls=[call]), chat_delta("tool_calls"), CHAT_DONE]),
        text_frames("It is 21 °C."),
    )
    weather = [{"role": "user", "content": "Weather in Paris?"}]
    turn, end = turn_of(server, start_stream(server.url, "agent", messages=weather))
    assert end.type == "done"
    assert [(b["kind"], b["content"], b["complete"]) for b in turn] == [
        ("tool_call", '{"city": "Paris"}', True),
        ("tool_result", json.dumps({"city": "Paris", "temp_c": 21}), True),
        ("text", "It is 21 °C.", True),
    ]
    assert turn[0]["meta"] == {"name": "get_weather", "call_id": "call_w",
                               "input": {"city": "Paris"}}  # fmt: skip
    assert turn[1]["meta"] == {"call_id": "call_w"}
    first, second = upstream.requests_for("gpt-4o-mini")
    assert first.body["tools"][0]["function"]["name"] == "get_weather"
    # The model's second call got its own tool call back, and the tool's result.
    assistant, tool = second.body["messages"][1:]
    assert assistant["tool_calls"][0]["id"] == "call_w"
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert tool == {"role": "tool", "tool_call_id": "call_w",
                    "content": json.dumps({"city": "Paris", "temp_c": 21})}  # fmt: skip
    assert SECRET_KEY not in server.log()


def test_anthropic_example_relays_thinking_and_text(
    server_factory: Any, upstream: Upstream
) -> None:
    server = serve(server_factory, upstream, "anthropic_chat:app")
    upstream.script("claude-sonnet-4-5", claude_frames("A greeting.", "Hello!"))
    hello = [{"role": "user", "content": "Hi!"}]
    turn, end = turn_of(server, start_stream(server.url, "chat", messages=hello))
    assert end.type == "done"
    assert end.json()["finish_reason"] == "end_turn"
    assert [(b["kind"], b["content"], b["meta"]) for b in turn] == [
        ("reasoning", "A greeting.", {"signature": "s1"}),
        ("text", "Hello!", {}),
    ]
    (request,) = upstream.requests_for("claude-sonnet-4-5")
    assert request.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def claude_frames(thinking: str, text: str, model: str = "claude-sonnet-4-5") -> Frames:
    start: dict[str, Any] = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 1}}}  # fmt: skip
    return Frames([anthropic_event(e) for e in [
        start,
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": thinking}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "s1"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    ]])  # fmt: skip


@pytest.fixture(scope="module")
def ai_sdk_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_folder(tmp_path_factory.mktemp("ai-sdk-example"), "ai@7", files=(SCRIPT,))


def test_ai_sdk_example_serves_use_chat_and_its_resume(
    server_factory: Any, upstream: Upstream, ai_sdk_home: Path
) -> None:
    server = serve(server_factory, upstream, "ai_sdk_chat:app")
    words = [f"word{n} " for n in range(40)]
    upstream.script("gpt-4o-mini", text_frames(*words, interval=0.02))
    got = node(ai_sdk_home, mode="chat", api=f"{server.url}/api/chat", chatId="example-1",
               text="Tell me something.", stopWhen="text")  # fmt: skip
    assert got["stopped"]
    assert got["errors"] == []
    _, reply = got["resumed"]  # the user's message and one reply
    assert [p["type"] for p in reply["parts"]] == ["text"]
    assert reply["parts"][0]["text"] == "".join(words)
    assert reply["metadata"]["finish_reason"] == "stop"
    (request,) = upstream.requests_for("gpt-4o-mini")
    assert request.body["messages"] == [{"role": "user", "content": "Tell me something."}]
    wait_done(server.url, reply["id"])
    assert httpx.get(f"{server.url}/api/chat/example-1/stream").status_code == 204


# -- the reference app, configured for a real model ------------------------------------------


def test_the_reference_chat_uses_the_configured_model(
    server_factory: Any, upstream: Upstream
) -> None:
    server = serve(server_factory, upstream, "app:app", CHAT_MODEL="ref-model")
    upstream.script("ref-model", text_frames("A real ", "answer."))
    conversation = httpx.post(f"{server.url}/chat/conversations", json={"title": "t"}).json()
    posted = httpx.post(
        f"{server.url}/chat/conversations/{conversation['id']}/messages", json={"text": "Hello?"}
    )
    assert posted.status_code == 201
    stream_id = posted.json()["reply"]["stream_id"]
    turn, end = turn_of(server, stream_id)
    assert end.type == "done"
    assert [(b["kind"], b["content"]) for b in turn] == [("text", "A real answer.")]
    (request,) = upstream.requests_for("ref-model")
    assert request.body["messages"] == [{"role": "user", "content": "Hello?"}]
    shown = httpx.get(f"{server.url}/chat/conversations/{conversation['id']}").json()
    assert shown["messages"][-1]["content"] == "A real answer."
    assert shown["messages"][-1]["state"] == "done"

    # The AI SDK route answers with the same model.
    upstream.script("ref-model", text_frames("Via ", "useChat."))
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}
    response = httpx.post(f"{server.url}/ai/chat", json={"id": "ref-1", "messages": [message]})
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    deltas = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert "".join(p["delta"] for p in deltas if p["type"] == "text-delta") == "Via useChat."
    assert SECRET_KEY not in server.log()


def test_the_reference_chat_uses_anthropic_when_configured(
    server_factory: Any, upstream: Upstream
) -> None:
    server = serve(server_factory, upstream, "app:app", openai=False, CHAT_MODEL="claude-ref")
    upstream.script("claude-ref", claude_frames("Thinking.", "From Claude."))
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}
    response = httpx.post(f"{server.url}/ai/chat", json={"id": "ref-2", "messages": [message]})
    assert response.status_code == 200
    parts = [json.loads(line[6:]) for line in response.text.splitlines()
             if line.startswith("data: {")]  # fmt: skip
    assert "".join(p["delta"] for p in parts if p["type"] == "reasoning-delta") == "Thinking."
    assert "".join(p["delta"] for p in parts if p["type"] == "text-delta") == "From Claude."
    (request,) = upstream.requests_for("claude-ref")
    assert request.path == "/v1/messages"
    assert request.body["messages"] == [{"role": "user", "content": "Hi"}]
