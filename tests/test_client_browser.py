"""The browser client in Debian's Chromium: a page that uses only ``/api/client.js``.

Through the cutting proxy it rebuilds exactly the producer's turn across more than 50 cuts; it
resumes after a reload mid-stream from its stored id, asks nothing after a reload past the end,
follows one stream from two tabs, and ends in a distinct state for a stream that does not exist,
a reader the app refuses, and a server that is gone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from tests.conftest import LIVE_APP, CuttingProxy, LiveServer, read_stream, start_stream

pytestmark = pytest.mark.timeout(240)

PAGE = """<!doctype html><meta charset="utf-8"><title>client</title>
<script type="module">
import * as client from "/api/client.js";
window.client = client;
window.follow = (url, options = {}) => {
  window.f = client.followStream(url, { events: ["citation", "usage", "status"], ...options });
  return window.f.state;
};
</script>"""
TERMINAL = "['done', 'error', 'cancelled'].includes(window.f.state)"


def steps(blocks: int, size: int) -> list[dict[str, Any]]:
    """A turn of ``blocks`` text blocks with a citation and a status after each."""
    out: list[dict[str, Any]] = []
    for n in range(blocks):
        text = f"Block {n}: " + "abcdefghij" * (size // 10) + "\n\n"
        out.append({"block": {"kind": "text", "meta": {"n": n}, "text": text}})
        out.append({"event": "citation", "data": {"n": n}})
        out.append({"event": "status", "data": {"done": n}, "replay": "latest"})
    return out


@pytest.fixture(scope="module")
def site(server_factory: Any) -> LiveServer:
    server: LiveServer = server_factory(
        {"SSE_RETRY_MS": 100, "SSE_HEARTBEAT_INTERVAL": 1}, app=LIVE_APP
    )
    return server


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context()
    errors: list[str] = []
    context.on("weberror", lambda e: errors.append(str(e.error)))
    context.route(
        "**/client-page", lambda route: route.fulfill(body=PAGE, content_type="text/html")
    )
    yield context
    context.close()
    assert errors == []


def open_page(context: BrowserContext, origin: str) -> Page:
    page = context.new_page()
    page.goto(f"{origin}/client-page")
    page.wait_for_function("window.follow !== undefined")
    return page


def wait_end(page: Page, timeout: float = 90_000) -> None:
    page.wait_for_function(TERMINAL, timeout=timeout, polling=50)


def the_turn(server: LiveServer, stream_id: str) -> dict[str, Any]:
    """What a plain reader from 0 rebuilds, in the client's shape."""
    transcript = read_stream(server.url, stream_id).transcript
    return {
        "blocks": [transcript.turn[i] for i in sorted(transcript.turn)],
        "citations": [d for _, name, d in transcript.app_events if name == "citation"],
        "status": transcript.latest["status"][1],
    }


def shown(page: Page) -> dict[str, Any]:
    turn: dict[str, Any] = page.evaluate("JSON.parse(JSON.stringify(window.f.turn))")
    assert turn["state"] == "done"
    return {
        "blocks": turn["blocks"],
        "citations": [e["data"] for e in turn["events"] if e["name"] == "citation"],
        "status": turn["latest"]["status"],
    }


def test_exact_across_more_than_fifty_cuts(context: BrowserContext, site: LiveServer) -> None:
    # How many cuts one turn takes depends on the schedule (a client that reconnects late gets
    # the blocks so far as one catch-up, fewer bytes); so turns follow one another until the
    # proxy has cut at least 50 times, and every one of them must be rebuilt exactly.
    proxy = CuttingProxy(site.url, seed=11, max_bytes=700, only=b"GET /api/streams/", in_body=True)
    page = open_page(context, proxy.url)
    reconnects = turns = 0
    try:
        while (proxy.cuts < 50 or reconnects < 50) and turns < 10:
            stream_id = start_stream(site.url, "script", steps=steps(24, 60), chunk_size=2,
                                     interval_ms=8)  # fmt: skip
            page.evaluate(f"follow('/api/streams/{stream_id}')")
            wait_end(page)
            turns += 1
            reconnects += page.evaluate("window.f.reconnects")
            assert shown(page) == the_turn(site, stream_id)
    finally:
        proxy.close()
    assert proxy.cuts >= 50, (proxy.cuts, turns)
    assert reconnects >= 50


def test_a_reload_mid_stream_resumes_and_one_after_the_end_asks_nothing(
    context: BrowserContext, site: LiveServer
) -> None:
    stream_id = start_stream(site.url, "script", steps=steps(12, 40), chunk_size=2,
                             interval_ms=10)  # fmt: skip
    url = f"/api/streams/{stream_id}"
    page = open_page(context, site.url)
    page.evaluate(f"follow({url!r})")
    page.wait_for_function("window.f.turn.blocks.length >= 3", polling=50)
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if f"{url}?" in r.url else None)
    page.reload()
    page.wait_for_function("window.follow !== undefined")
    page.evaluate(f"follow({url!r})")
    wait_end(page)
    assert shown(page) == the_turn(site, stream_id)
    # It asks only for what came after the id stored before the reload, never from the start
    # (a busy page may be cut for lagging and resume again: each resume asks from further on).
    prefix = f"{site.url}{url}?last_event_id="
    assert asked
    assert all(a.startswith(prefix) for a in asked)
    ids = [int(a.removeprefix(prefix)) for a in asked]
    assert ids[0] > 0
    assert ids == sorted(ids)
    before = len(asked)
    page.reload()  # after the end: the stored turn is whole; no request at all
    page.wait_for_function("window.follow !== undefined")
    assert page.evaluate(f"follow({url!r})") == "done"
    page.wait_for_timeout(300)
    assert len(asked) == before
    assert shown(page) == the_turn(site, stream_id)


def test_two_tabs_follow_one_stream_each_exactly(context: BrowserContext, site: LiveServer) -> None:
    stream_id = start_stream(site.url, "script", steps=steps(8, 40), chunk_size=3,
                             interval_ms=5)  # fmt: skip
    tabs = [open_page(context, site.url) for _ in range(2)]
    for tab in tabs:
        tab.evaluate(f"follow('/api/streams/{stream_id}')")
    want = the_turn(site, stream_id)
    for tab in tabs:
        wait_end(tab)
        assert shown(tab) == want


def test_refusals_are_distinct_states(
    context: BrowserContext, site: LiveServer, server_factory: Any
) -> None:
    page = open_page(context, site.url)
    page.evaluate("follow('/api/streams/no-such-stream')")
    page.wait_for_function("window.f.state === 'not-found'", polling=50)

    secure: LiveServer = server_factory(
        {"SSE_RETRY_MS": 100}, app="tests.helpers.secure_app:app", ready=("/", 200)
    )
    response = httpx.post(
        f"{secure.url}/api/streams", json={"producer": "echo", "input": {"text": "mine"}},
        headers={"X-User": "alice"},
    )  # fmt: skip
    url = response.json()["stream_url"]
    page = open_page(context, secure.url)
    page.evaluate(f"follow({url!r})")  # EventSource sends no X-User: the app says 401
    page.wait_for_function("window.f.state === 'unauthorized'", polling=50)
    fetch = "{transport: 'fetch', headers: {'X-User': 'mallory'}, store: null}"
    page.evaluate(f"follow({url!r}, {fetch})")  # another user's stream: 403
    page.wait_for_function("window.f.state === 'forbidden'", polling=50)
    owner = "{transport: 'fetch', headers: {'X-User': 'alice'}, store: null}"
    page.evaluate(f"follow({url!r}, {owner})")  # the owner, with the NDJSON transport
    page.wait_for_function("window.f.state === 'done'", polling=50)
    assert page.evaluate("window.f.turn.blocks[0].content") == "mine"


def test_a_server_that_is_gone_ends_in_unreachable(
    context: BrowserContext, server_factory: Any
) -> None:
    server: LiveServer = server_factory({"SSE_RETRY_MS": 100}, app=LIVE_APP)
    stream_id = start_stream(server.url, "script", steps=steps(40, 60), chunk_size=1,
                             interval_ms=20)  # fmt: skip
    page = open_page(context, server.url)
    page.evaluate(f"follow('/api/streams/{stream_id}', {{maxRetries: 3}})")
    page.wait_for_function("window.f.state === 'open'", polling=50)
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)  # gone at once (a SIGTERM would end the stream)
    server.proc.wait()
    page.wait_for_function("window.f.state === 'unreachable'", timeout=30_000, polling=50)
    assert page.evaluate("window.f.reconnects") >= 3
