"""The Vercel AI SDK as a client: its own UI message stream reader, chat transport and Chat (what
``useChat`` runs), from the npm ``ai`` package in Node, against gunicorn.

The message the SDK rebuilds must equal the stream's turn by the documented mapping: a text or
reasoning part per block with its whole content, a tool part per call with the call's input and
its result's output, ``data-*`` parts for app events (every durable one once, the newest of each
``latest`` name). Also after a stop mid-text or mid-tool-call and a resume in a new Chat (a
reload): one assistant message, never two, and no text twice.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    LIVE_APP,
    ROOT,
    LiveServer,
    npm_folder,
    read_stream,
    start_stream,
    wait_done,
)

SCRIPT = ROOT / "tests/helpers/node/aisdk.mjs"
pytestmark = pytest.mark.timeout(180)

STEPS: list[dict[str, Any]] = [
    {"event": "status", "data": {"phase": "thinking"}, "replay": "latest"},
    {"block": {"kind": "reasoning", "meta": {}, "text": "The user wants the weather in Paris."}},
    {"event": "status", "data": {"phase": "calling"}, "replay": "latest"},
    {"block": {"kind": "tool_call", "meta": {"name": "weather", "call_id": "c1"},
               "text": '{"city": "Paris", "unit": "celsius"}',
               "end_meta": {"input": {"city": "Paris", "unit": "celsius"}}}},
    {"block": {"kind": "tool_result", "meta": {"call_id": "c1"}, "text": '{"temp_c": 21}'}},
    {"event": "typing", "data": {}, "replay": "ephemeral"},
    {"block": {"kind": "text", "meta": {}, "text": "It is 21 °C in Paris. "}},
    {"block": {"kind": "text", "meta": {}, "text": "Enjoy the sun! 🙂"}},
    {"event": "citation", "data": {"url": "https://example.org/weather"}},
    {"event": "usage", "data": {"output_tokens": 17}},
    {"event": "status", "data": {"phase": "done"}, "replay": "latest"},
]  # fmt: skip


@pytest.fixture(scope="module")
def ai_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the npm ``ai`` package (7.x, the current major) and our script."""
    return npm_folder(tmp_path_factory.mktemp("ai-sdk"), "ai@7", files=(SCRIPT,))


def node(ai_sdk: Path, **args: Any) -> dict[str, Any]:
    done = subprocess.run(
        ["node", "aisdk.mjs", json.dumps(args)],
        cwd=ai_sdk, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert "failed" not in result, result["failed"]
    assert "timeout" not in result
    return result


def expected(server: LiveServer, stream_id: str) -> dict[str, Any]:
    """The turn as the contract's client rule builds it (SSE), mapped to what the SDK shows."""
    got = read_stream(server.url, stream_id)
    assert got.events[-1].type == "done"
    blocks = [got.transcript.turn[i] for i in sorted(got.transcript.turn)]
    results = {b["meta"]["call_id"]: json.loads(b["content"])
               for b in blocks if b["kind"] == "tool_result"}  # fmt: skip
    parts: list[dict[str, Any]] = []
    for b in blocks:
        if b["kind"] in ("text", "reasoning"):
            parts.append({"type": b["kind"], "text": b["content"], "state": "done"})
        elif b["kind"] == "tool_call":
            call = b["meta"]["call_id"]
            parts.append({"type": f"tool-{b['meta']['name']}", "toolCallId": call,
                          "state": "output-available", "input": b["meta"]["input"],
                          "output": results[call]})  # fmt: skip
    durable = [(f"data-{name}", data) for _, name, data in got.transcript.app_events
               if name in ("citation", "usage")]  # fmt: skip
    latest = {f"data-{name}": data for name, (_, data) in got.transcript.latest.items()
              if name == "status"}  # fmt: skip
    return {"parts": parts, "durable": durable, "latest": latest}


def shown(message: dict[str, Any]) -> dict[str, Any]:
    """What the SDK built, in the same shape (data parts: durable in order, latest by name)."""
    keep = ("type", "text", "state", "toolCallId", "input", "output")
    parts = [{k: p[k] for k in keep if k in p} for p in message["parts"]
             if not p["type"].startswith("data-")]  # fmt: skip
    data = [p for p in message["parts"] if p["type"].startswith("data-")]
    durable = [(p["type"], p["data"]) for p in data if p["type"] != "data-status"]
    latest = {p["type"]: p["data"] for p in data if p["type"] == "data-status"}
    assert len([p for p in data if p["type"] == "data-status"]) == 1  # replaced, not added
    return {"parts": parts, "durable": durable, "latest": latest}


def script_stream(server: LiveServer, interval_ms: int = 2) -> str:
    return start_stream(server.url, "script", steps=STEPS, chunk_size=3, interval_ms=interval_ms)


def test_the_sdk_reader_rebuilds_the_turn_live_and_after_the_end(
    ai_sdk: Path, server: LiveServer
) -> None:
    stream_id = script_stream(server, interval_ms=10)
    url = f"{server.url}/api/streams/{stream_id}?format=ai-sdk"
    live = node(ai_sdk, mode="read", url=url)["message"]  # joined while it runs
    want = expected(server, stream_id)
    assert live["id"] == stream_id
    assert shown(live) == want
    assert shown(node(ai_sdk, mode="read", url=url)["message"]) == want  # after its end


def test_the_sdk_reader_rebuilds_a_turn_from_the_store_alone(
    ai_sdk: Path, server_factory: Any
) -> None:
    server: LiveServer = server_factory({"SSE_RETENTION": 0.2}, app=LIVE_APP)
    stream_id = script_stream(server)
    want = expected(server, stream_id)
    time.sleep(1.0)  # past its retention: only the database has it
    url = f"{server.url}/api/streams/{stream_id}?format=ai-sdk"
    message = node(ai_sdk, mode="read", url=url)["message"]
    assert shown(message) == want


def test_the_answer_speaks_the_ui_message_stream_protocol(server: LiveServer) -> None:
    stream_id = script_stream(server)
    wait_done(server.url, stream_id)
    response = httpx.get(f"{server.url}/api/streams/{stream_id}", params={"format": "ai-sdk"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    parts = [json.loads(f[6:]) for f in frames[:-1]]
    assert parts[0] == {"type": "start", "messageId": stream_id}
    assert parts[-1]["type"] == "finish"
    assert parts[-1]["finishReason"] == "stop"
    # The ephemeral event is live only: a read after the end has no trace of it.
    assert not [p for p in parts if p["type"] == "data-typing"]


@pytest.mark.parametrize("stop_when", ["text", "tool-input"])
def test_use_chat_resumes_mid_stream_without_a_duplicate(
    ai_sdk: Path, server: LiveServer, stop_when: str
) -> None:
    chat_id = f"chat-{stop_when}-{time.monotonic_ns()}"
    got = node(ai_sdk, mode="chat", api=f"{server.url}/ai/chat", chatId=chat_id,
               text="weather in Paris?", body={"chunk_size": 3, "interval_ms": 15},
               stopWhen=stop_when)  # fmt: skip
    assert got["stopped"], "the reply ended before the stop point"
    assert got["errors"] == []
    assert got["status"] == "ready"
    user, reply = got["resumed"]  # one assistant message: the resumed one replaced the partial
    assert user["role"] == "user"
    assert reply["role"] == "assistant"
    stream_id = reply["id"]
    assert got["first"][1]["id"] == stream_id
    assert shown(reply) == expected(server, stream_id)


def test_resume_after_the_reply_ended_is_a_204_and_changes_nothing(
    ai_sdk: Path, server: LiveServer
) -> None:
    chat_id = f"chat-ended-{time.monotonic_ns()}"
    got = node(ai_sdk, mode="chat", api=f"{server.url}/ai/chat", chatId=chat_id,
               text="hi", body={"chunk_size": 50, "interval_ms": 0})  # fmt: skip
    stream_id = got["resumed"][1]["id"]
    wait_done(server.url, stream_id)
    response = httpx.get(f"{server.url}/ai/chat/{chat_id}/stream")
    assert response.status_code == 204
    assert httpx.get(f"{server.url}/ai/chat/never-seen/stream").status_code == 204
    resumed = node(ai_sdk, mode="resume", api=f"{server.url}/ai/chat", chatId=chat_id,
                   messages=got["resumed"])  # fmt: skip
    assert resumed["status"] == "ready"
    assert resumed["messages"] == got["resumed"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("id=x&messages=y", "application/x-www-form-urlencoded"),  # a form cannot post here
        (json.dumps({"messages": []}), "application/json"),
        (json.dumps({"id": "a b", "messages": []}), "application/json"),
        (json.dumps({"id": "c", "messages": "hi"}), "application/json"),
        (json.dumps({"id": "c", "messages": [{"role": "user"}]}), "application/json"),
        (
            json.dumps({"id": "c", "messages": [{"role": "assistant", "parts": []}]}),
            "application/json",
        ),
    ],
)
def test_the_chat_route_refuses_bad_input_with_a_json_reason(
    server: LiveServer, body: str, content_type: str
) -> None:
    response = httpx.post(
        f"{server.url}/ai/chat", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str)


def test_an_unknown_format_is_a_400(server: LiveServer) -> None:
    stream_id = script_stream(server)
    response = httpx.get(f"{server.url}/api/streams/{stream_id}", params={"format": "aisdk"})
    assert response.status_code == 400
    assert "ai-sdk" in response.json()["error"]


def test_another_instance_serves_the_same_message(
    ai_sdk: Path, server_factory: Any, redis_server: Any, postgres: Any
) -> None:
    """Read through another instance's mirror (Redis), the SDK rebuilds the same message: the
    replay mode of each app event travels with it, so the newest ``latest`` event still replaces
    the others (one ``data-status`` part) and the ephemeral one stays transient."""
    from tests.test_redis import shared_config

    config = shared_config(redis_server, postgres)
    owner = server_factory(config, app=LIVE_APP)
    other = server_factory(config, app=LIVE_APP)
    stream_id = script_stream(owner, interval_ms=10)
    url = f"{other.url}/api/streams/{stream_id}?format=ai-sdk"
    live = node(ai_sdk, mode="read", url=url)["message"]  # joined while it runs
    want = expected(owner, stream_id)
    assert shown(live) == want
    assert shown(node(ai_sdk, mode="read", url=url)["message"]) == want
