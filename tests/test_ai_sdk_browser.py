"""The AI SDK's ``Chat`` (the class ``useChat`` wraps) in real Chromium, with no bundler.

The npm ``ai`` package and its dependencies are ES modules, so a page loads them through an
import map (``useChat`` itself needs React, whose npm build is CommonJS: that part cannot be had
without a bundler). Playwright serves the page and ``node_modules`` on the app's own origin; the
chat's requests go to the reference app under gunicorn. A reload mid-reply resumes it
(``resume: true``'s ``resumeStream()``) into one assistant message equal to the turn; a reload
after the end asks once and gets a ``204``.

One dependency is not an ES module: ``@vercel/oidc`` (CommonJS, used only by the AI Gateway
provider to fetch a Vercel token, never by a chat client) is mapped to a stub of its two
functions. Everything else the page runs is the npm packages' own code.
"""

from __future__ import annotations

import dataclasses
import json
import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route

from tests.conftest import LiveServer, npm_folder
from tests.test_ai_sdk import expected, shown

pytestmark = pytest.mark.timeout(180)

PAGE = """<!doctype html>
<meta charset="utf-8">
<script type="importmap">%(imports)s</script>
<pre id="out"></pre>
<script type="module">
import { AbstractChat, DefaultChatTransport } from "ai";

const key = "chat-messages";
class State {
  constructor(messages) { this.messages = messages; this.status = "ready"; this.error = undefined; }
  save() { sessionStorage.setItem(key, JSON.stringify(this.messages)); }
  pushMessage(m) { this.messages = this.messages.concat(m); this.save(); }
  popMessage() { this.messages = this.messages.slice(0, -1); this.save(); }
  replaceMessage(i, m) {
    this.messages = [...this.messages.slice(0, i), m, ...this.messages.slice(i + 1)];
    this.save();
  }
  snapshot(value) { return structuredClone(value); }
}
class Chat extends AbstractChat {
  constructor({ messages, ...init }) { super({ ...init, state: new State(messages) }); }
}
const saved = JSON.parse(sessionStorage.getItem(key) ?? "[]");
const chat = new Chat({
  id: "browser-chat-%(suffix)s",
  messages: saved,
  transport: new DefaultChatTransport({
    api: "/ai/chat", body: { chunk_size: 3, interval_ms: 15 },
  }),
});
window.chat = chat;
window.done = saved.length ? chat.resumeStream() : Promise.resolve();  // what resume: true does
</script>
"""


def import_map(modules: Path) -> dict[str, str]:
    """Bare specifier → URL for every ES module entry point the packages export."""
    imports: dict[str, str] = {}
    for manifest in [*modules.glob("*/package.json"), *modules.glob("@*/*/package.json")]:
        package = manifest.parent.relative_to(modules).as_posix()
        spec = json.loads(manifest.read_text())
        exports = spec.get("exports") or spec.get("module") or spec.get("main") or "index.js"
        if isinstance(exports, str) or not any(k.startswith(".") for k in exports):
            exports = {".": exports}
        for subpath, target in exports.items():
            entry = _pick(target)
            if entry is None:
                continue
            if subpath.endswith("/*") and entry.endswith("/*"):  # a folder: a prefix mapping
                subpath, entry = subpath[:-1], entry[:-1]
            elif "*" in subpath:
                continue
            imports[package + subpath[1:]] = f"/node_modules/{package}/{entry.removeprefix('./')}"
    imports["@vercel/oidc"] = OIDC_STUB
    return imports


OIDC_STUB = (
    "data:text/javascript,export const getContext = () => ({});"
    "export const getVercelOidcToken = async () => { throw new Error('no OIDC here'); };"
)


def _pick(target: Any) -> str | None:
    if isinstance(target, str):
        return target
    if isinstance(target, dict):
        for condition in ("browser", "import", "default"):
            if condition in target:
                found = _pick(target[condition])
                if found is not None:
                    return found
    return None


@pytest.fixture(scope="module")
def ai_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_folder(tmp_path_factory.mktemp("ai-sdk-browser"), "ai@7") / "node_modules"


@dataclasses.dataclass
class ChatPage:
    page: Page
    responses: list[tuple[str, str, int]]  # method, URL, status of every response it got

    def resumes(self) -> list[int]:
        """The statuses of the resume requests (``GET /ai/chat/<id>/stream``)."""
        return [status for method, url, status in self.responses
                if method == "GET" and url.endswith("/stream")]  # fmt: skip


@pytest.fixture
def chat_page(browser: Browser, server: LiveServer, ai_modules: Path) -> Iterator[ChatPage]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    suffix = str(id(page))
    html = PAGE % {"imports": json.dumps({"imports": import_map(ai_modules)}), "suffix": suffix}

    def module(route: Route) -> None:
        path = route.request.url.split("/node_modules/", 1)[1].split("?")[0]
        file = ai_modules / path
        if not file.is_file():
            route.fulfill(status=404)
            return
        kind = mimetypes.guess_type(file.name)[0] or "text/javascript"
        route.fulfill(body=file.read_bytes(), content_type=kind.replace("application/", "text/"))

    responses: list[tuple[str, str, int]] = []
    page.on("response", lambda r: responses.append((r.request.method, r.url, r.status)))
    page.route(f"{server.url}/node_modules/**", module)
    page.route(f"{server.url}/ai-chat-page", lambda route: route.fulfill(
        body=html, content_type="text/html"))  # fmt: skip
    page.goto(f"{server.url}/ai-chat-page")
    try:
        page.wait_for_function("window.chat !== undefined", timeout=15_000)
    except Exception:
        raise AssertionError(f"the page did not load: {errors} {responses}") from None
    yield ChatPage(page, responses)
    context.close()
    assert errors == []


def messages(page: Page) -> list[dict[str, Any]]:
    # As JSON: what sessionStorage keeps (fields the SDK left undefined are left out).
    found: list[dict[str, Any]] = page.evaluate("JSON.parse(JSON.stringify(window.chat.messages))")
    return found


def test_a_reload_mid_reply_resumes_it_once_and_exactly(
    chat_page: ChatPage, server: LiveServer
) -> None:
    page = chat_page.page
    page.evaluate("() => { window.chat.sendMessage({ text: 'weather in Paris?' }); }")
    page.wait_for_function(
        "() => { const m = window.chat.messages.at(-1);"
        " return m && m.role === 'assistant' &&"
        " m.parts.some(p => p.type === 'text' && p.state === 'streaming'); }",
        timeout=30_000,
        polling=20,
    )
    page.reload()  # mid-reply: the page keeps its messages in sessionStorage and resumes
    page.wait_for_function("window.chat !== undefined")
    page.evaluate("window.done")
    assert page.evaluate("window.chat.status") == "ready"
    user, reply = messages(page)
    assert user["role"] == "user"
    assert reply["role"] == "assistant"
    assert shown(reply) == expected(server, reply["id"])
    assert chat_page.resumes() == [200]

    page.reload()  # after the end: one request, a 204, and the messages as they were
    page.wait_for_function("window.chat !== undefined")
    page.evaluate("window.done")
    assert messages(page) == [user, reply]
    assert chat_page.resumes() == [200, 204]  # no request loop
