"""The browser client as a file: served by the blueprint, packable for npm, typed, small, and its
rules under Node's test runner over a stream recorded from a real server.

(In Chromium, through the cutting proxy: ``test_client_browser.py``.)
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from sse_blueprint.web.views import CLIENT_VERSION
from tests.conftest import LIVE_APP, ROOT, LiveServer, npm_folder, start_stream, wait_done

CLIENT = ROOT / "sse_blueprint/js"
pytestmark = pytest.mark.timeout(300)


def test_the_blueprint_serves_the_client_with_an_etag_and_a_pinned_url(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/api/client.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.content == (CLIENT / "index.js").read_bytes()
    assert "no-cache" in response.headers["cache-control"]
    etag = response.headers["etag"]
    again = httpx.get(f"{server.url}/api/client.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    pinned = httpx.get(f"{server.url}/api/client.js", params={"v": CLIENT_VERSION})
    assert "immutable" in pinned.headers["cache-control"]
    assert "max-age=31536000" in pinned.headers["cache-control"]
    assert httpx.post(f"{server.url}/api/client.js", json={}).status_code == 405


def test_the_served_version_is_the_package_version() -> None:
    package = json.loads((CLIENT / "package.json").read_text())
    assert package["version"] == CLIENT_VERSION


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_folder(tmp_path_factory.mktemp("js-tools"), "esbuild@0", "typescript@5")


def test_the_client_is_small(tools: Path) -> None:
    minified = subprocess.run(
        [str(tools / "node_modules/.bin/esbuild"), str(CLIENT / "index.js"), "--minify",
         "--format=esm"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    size = len(gzip.compress(minified, 9))
    print(f"client.js: {len(minified)} bytes minified, {size} gzipped")
    assert size <= 3072  # the budget the README states


def test_the_declarations_type_check_a_user_of_every_name(tools: Path, tmp_path: Path) -> None:
    shutil.copytree(CLIENT, tmp_path / "client")
    (tmp_path / "use.ts").write_text(
        "import { APP_EVENTS, StreamFollower, applyEvent, followStream, newTurn } from"
        ' "./client/index.js";\n'
        'import type { Block, FollowerState, FollowOptions, Turn } from "./client/index.js";\n'
        "const options: FollowOptions = { store: null, transport: 'fetch', events: APP_EVENTS,\n"
        "  headers: { Authorization: 'Bearer x' }, maxRetries: 3,\n"
        "  onChange: (turn: Turn) => turn.blocks.map((b: Block) => b.content),\n"
        "  onState: (state: FollowerState, f: StreamFollower) => f.reconnects };\n"
        "const f: StreamFollower = followStream('/api/streams/x', options);\n"
        "f.addEventListener('change', () => f.turn.latest['status']);\n"
        "const t: Turn = newTurn();\n"
        "const applied: boolean = applyEvent(t, 1, 'text_delta', { block: 0, text: 'x' });\n"
        "void f.cancel().then((r: Response) => r.status);\n"
        "f.close();\n"
        "export { applied };\n"
        "// @ts-expect-error: not a state\n"
        "const wrong: FollowerState = 'closing';\n"
        "export { wrong };\n"
    )
    done = subprocess.run(
        [str(tools / "node_modules/.bin/tsc"), "--noEmit", "--strict", "--target", "es2022",
         "--module", "nodenext", "--moduleResolution", "nodenext", "--lib", "es2022,dom",
         "--allowJs", "false", "use.ts"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_npm_pack_holds_the_module_and_its_types(tmp_path: Path) -> None:
    shutil.copytree(CLIENT, tmp_path / "client")
    npm = shutil.which("npm")
    assert npm
    done = subprocess.run(
        [npm, "pack", "--dry-run", "--json"], cwd=tmp_path / "client",
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    (packed,) = json.loads(done.stdout)
    assert packed["name"] == "sse-blueprint-client"
    assert sorted(f["path"] for f in packed["files"]) == [
        "README.md", "index.d.ts", "index.js", "package.json",
    ]  # fmt: skip


STEPS: list[dict[str, Any]] = [
    {"event": "status", "data": {"phase": "thinking"}, "replay": "latest"},
    {"block": {"kind": "reasoning", "meta": {}, "text": "First I think about it for a while."}},
    {"event": "status", "data": {"phase": "calling"}, "replay": "latest"},
    {"block": {"kind": "tool_call", "meta": {"name": "search", "call_id": "c1"},
               "text": '{"query": "streams"}', "end_meta": {"input": {"query": "streams"}}}},
    {"block": {"kind": "tool_result", "meta": {"call_id": "c1"}, "text": '{"hits": 3}'}},
    {"event": "citation", "data": {"url": "https://example.org/1"}},
    {"block": {"kind": "text", "meta": {}, "text": "An answer in two blocks, "}},
    {"event": "citation", "data": {"url": "https://example.org/2"}},
    {"block": {"kind": "text", "meta": {}, "text": "with unicode: héllo 🙂."}},
    {"event": "usage", "data": {"output_tokens": 21}},
    {"event": "status", "data": {"phase": "done"}, "replay": "latest"},
]  # fmt: skip


def test_node_reducer_tests_over_a_recorded_stream(server_factory: Any, tmp_path: Path) -> None:
    # A tiny live buffer: readers from most positions get the turn from the database, merged.
    server: LiveServer = server_factory({"SSE_BUFFER_SIZE": 8}, app=LIVE_APP)
    stream_id = start_stream(server.url, "script", steps=STEPS, chunk_size=3, interval_ms=1)
    status = wait_done(server.url, stream_id)
    answers: dict[str, list[Any]] = {}
    catchups = 0
    for position in range(status["last_event_id"] + 1):
        response = httpx.get(
            f"{server.url}/api/streams/{stream_id}",
            params={"format": "ndjson", "last_event_id": str(position)},
        )
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        answers[str(position)] = [[e["id"], e["event"], e["data"]] for e in lines]
        catchups += any(e["event"] == "turnblock_catchup" for e in lines)
    assert catchups > status["last_event_id"] // 2  # most answers merge the database's turn
    durable = [[s["event"], s["data"]] for s in STEPS if "event" in s and "replay" not in s]
    recording = {
        "answers": answers,
        "durable": durable,
        "durableNames": sorted({name for name, _ in durable}),
        "latest": {"status": {"phase": "done"}},
    }
    path = tmp_path / "recording.json"
    path.write_text(json.dumps(recording))
    done = subprocess.run(
        ["node", "--test", str(ROOT / "tests/helpers/node/client.test.mjs")],
        env={"PATH": str(Path(shutil.which("node") or "node").parent), "SSE_RECORDING": str(path)},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    print(done.stdout[-2000:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 3" in done.stdout
    assert "# skipped 0" in done.stdout
