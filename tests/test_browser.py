"""The reference page in a real browser: Debian's Chromium driven by Playwright, real gunicorn."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page

from app import compose_turn
from tests.conftest import LIVE_APP, CuttingProxy, LiveServer, read_stream


@pytest.fixture(scope="module")
def web(server_factory: Any) -> LiveServer:
    server: LiveServer = server_factory(
        {"SSE_RETRY_MS": 200, "SSE_HEARTBEAT_INTERVAL": 1}, app=LIVE_APP
    )
    return server


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    # The page's own code never throws; failed loads are only the cuts the proxy makes on purpose.
    assert [e for e in errors if "ERR_" not in e and "Failed to load" not in e] == []


def ask(page: Page, base: str, prompt: str) -> None:
    page.goto(base + "/")
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_selector(".message.assistant")


def rendered(page: Page) -> str:
    text: str = page.eval_on_selector(".message.assistant:last-child .body", "e => e.textContent")
    return text


def stored_reply(base: str, page: Page) -> dict[str, Any]:
    conversation_id = page.evaluate("page.conversation")
    messages = httpx.get(f"{base}/chat/conversations/{conversation_id}").json()["messages"]
    reply: dict[str, Any] = messages[-1]
    assert reply["role"] == "assistant"
    return reply


def wait_state(page: Page, state: str, timeout: float = 30_000) -> None:
    page.wait_for_function(f"document.body.dataset.conn === {state!r}", timeout=timeout)


def wait_saved(base: str, page: Page) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = stored_reply(base, page)
        if reply["state"] != "streaming":
            return reply
        time.sleep(0.05)
    raise AssertionError("the assistant message was not saved")


def test_chat_reply_streams_to_completion(page: Page, web: LiveServer) -> None:
    ask(page, web.url, "What happens when my connection drops?")
    wait_state(page, "open", 10_000)
    wait_state(page, "done")
    reply = wait_saved(web.url, page)
    produced = read_stream(web.url, reply["stream_id"]).transcript.text()
    assert rendered(page) == produced == reply["content"]
    assert "What happens when my connection drops?" in produced
    assert reply["state"] == "done"
    assert page.text_content("#reconnects") == "0"
    assert int(page.text_content("#last-id") or 0) > 10


def test_eventsource_reconnects_through_cuts_and_stays_exact(page: Page, web: LiveServer) -> None:
    proxy = CuttingProxy(web.url, seed=7, max_bytes=2500, only=b"GET /api/streams/", in_body=True)
    try:
        ask(page, proxy.url, "Cut me anywhere, please.")
        wait_state(page, "done", 60_000)
    finally:
        proxy.close()
    reply = wait_saved(web.url, page)
    assert rendered(page) == reply["content"]
    assert rendered(page) == read_stream(web.url, reply["stream_id"]).transcript.text()
    assert proxy.cuts >= 2
    assert int(page.text_content("#reconnects") or 0) >= 2  # EventSource did it by itself


def test_reload_mid_reply_resumes_the_same_stream(page: Page, web: LiveServer) -> None:
    ask(page, web.url, "Reload in the middle of this.")
    page.wait_for_function(
        "document.querySelector('.message.assistant .body').textContent.length > 120"
    )
    before = int(page.text_content("#last-id") or 0)
    page.reload()
    wait_state(page, "done")
    resumed_from = int(page.evaluate("document.body.dataset.resumedFrom"))
    assert resumed_from >= before > 0  # it asked only for what came after its stored id
    reply = wait_saved(web.url, page)
    assert rendered(page) == reply["content"]
    assert page.locator(".message.assistant").count() == 1


def test_cancel_button_ends_in_the_cancelled_state(page: Page, web: LiveServer) -> None:
    ask(page, web.url, "Start a reply I will cancel.")
    page.wait_for_function(
        "document.querySelector('.message.assistant .body').textContent.length > 40"
    )
    page.click("#cancel")
    wait_state(page, "cancelled", 10_000)
    reply = wait_saved(web.url, page)
    assert reply["state"] == "cancelled"
    shown = rendered(page)
    assert 40 < len(shown) < 400
    assert reply["content"] == shown  # what was streamed before the cancel, saved as is
    status = httpx.get(f"{web.url}/api/streams/{reply['stream_id']}/status").json()
    assert status["state"] == "cancelled"


def test_progress_bar_reaches_100(page: Page, web: LiveServer) -> None:
    page.goto(web.url + "/")
    page.click("#run-job")
    page.wait_for_function("document.body.dataset.job === 'done'", timeout=20_000)
    assert page.eval_on_selector("#job-progress", "e => e.value") == 100
    assert page.text_content("#job-message") == "Done: processed 20 items"


def test_past_conversations_load_from_the_database(page: Page, web: LiveServer) -> None:
    ask(page, web.url, "Remember this one.")
    wait_state(page, "done")
    reply = wait_saved(web.url, page)
    conversation_id = page.evaluate("page.conversation")
    other = page.context.new_page()
    other.goto(web.url + "/")
    other.click(f"#conversations a[data-id='{conversation_id}']")
    other.wait_for_selector(".message.assistant")
    assert rendered(other) == reply["content"]
    assert other.text_content(".message.user .body") == "Remember this one."


def test_phone_width_has_no_horizontal_scroll(page: Page, web: LiveServer) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    ask(page, web.url, "A narrow screen")
    wait_state(page, "done")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0


def shown_turn(page: Page, stream_id: str) -> dict[str, Any]:
    """The page's own turn state for ``stream_id``: blocks by number, app events, state."""
    turn: dict[str, Any] = page.evaluate(f"page.turns[{stream_id!r}]")
    turn["blocks"] = dict(enumerate(turn["blocks"]))
    turn["events"] = [(e["id"], e["name"], e["data"]) for e in turn["events"]]
    return turn


def assert_page_shows(page: Page, stream_id: str, prompt: str) -> None:
    """The page holds and shows the whole turn the stand-in agent produced for ``prompt``."""
    steps = compose_turn(prompt)
    blocks = [s["block"] for s in steps if "block" in s]
    want = {
        i: {"kind": b["kind"], "meta": {**b["meta"], **b["end_meta"]}, "content": b["text"],
            "complete": True}
        for i, b in enumerate(blocks)
    }  # fmt: skip
    turn = shown_turn(page, stream_id)
    assert turn["state"] == "done"
    assert turn["blocks"] == want
    assert [(e[1], e[2]) for e in turn["events"] if e[1] != "status"] == [
        (s["event"], s["data"]) for s in steps if s.get("replay") == "durable"
    ]
    message = page.locator(".message.assistant").last
    reasoning = message.locator("details.block.reasoning")
    assert reasoning.count() == 1
    assert reasoning.get_attribute("open") is None  # collapsed
    assert reasoning.locator(".content").text_content() == blocks[0]["text"]
    call = message.locator(".block.tool-call")
    assert "search" in (call.locator(".label").text_content() or "")
    assert (
        json.loads(call.locator(".content").text_content() or "") == blocks[1]["end_meta"]["input"]
    )
    result = json.loads(message.locator(".block.tool-result .content").text_content() or "")
    assert result == json.loads(blocks[2]["text"])
    answer = "".join(b["text"] for b in blocks if b["kind"] == "text")
    assert message.locator(".body").text_content() == answer
    assert message.locator(".citations li a").all_text_contents() == [
        s["data"]["title"] for s in steps if s.get("event") == "citation"
    ]


def test_whole_turn_after_a_reload_mid_tool_call_and_after_the_end(
    page: Page, web: LiveServer
) -> None:
    prompt = "Will it rain in Paris tomorrow?"
    page.goto(web.url + "/")
    page.evaluate(f"send({prompt!r}, {{chunk_size: 2, interval_ms: 30}})")
    page.wait_for_selector(
        ".message.assistant .block.tool-call[data-complete='false']", timeout=20_000
    )
    page.reload()  # in the middle of the tool call's arguments
    wait_state(page, "done")
    reply = wait_saved(web.url, page)
    stream_id = reply["stream_id"]
    assert int(page.evaluate("document.body.dataset.resumedFrom")) > 0
    assert_page_shows(page, stream_id, prompt)
    produced = read_stream(web.url, stream_id).transcript  # what any client rebuilds
    assert shown_turn(page, stream_id)["blocks"] == produced.turn
    assert reply["content"] == produced.text()
    page.reload()  # after the end: the turn comes from the stored stream
    page.wait_for_function(
        f"page.turns[{stream_id!r}] && page.turns[{stream_id!r}].state === 'done'"
    )
    assert_page_shows(page, stream_id, prompt)
    assert page.locator(".message.assistant").count() == 1
