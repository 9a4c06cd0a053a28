"""SSE clients the project did not write, in Node: the npm ``eventsource`` package.

It follows a stream to its end (the leading ``retry:`` block is not an event to it), resumes
from a stored id, and stops for good on the ``204`` of a stream whose end it holds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEMO_TEXT, ROOT, LiveServer, npm_folder, start_demo
from tests.helpers.sse_parser import Transcript

FOLLOW = ROOT / "tests/helpers/node/follow.mjs"


@pytest.fixture(scope="module")
def node_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``eventsource`` from npm (3.x: the line that runs on Node 18 and 20)."""
    return npm_folder(tmp_path_factory.mktemp("node-clients"), "eventsource@3", files=(FOLLOW,))


def follow(node_app: Path, url: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", "follow.mjs", url], cwd=node_app, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_eventsource_follows_resumes_and_stops_on_204(
    node_app: Path, server: LiveServer
) -> None:
    stream_id = start_demo(server.url, chunk_size=5, interval_ms=10)
    url = f"{server.url}/api/streams/{stream_id}"
    got = follow(node_app, url)
    assert not got.get("timeout")
    kinds = [kind for _, kind, _ in got["events"]]
    assert kinds[0] == "start"  # the retry block made no event
    assert kinds[-1] == "done"
    turn = Transcript()
    for event_id, kind, data in got["events"]:
        turn.apply(event_id, kind, data)
    assert turn.text() == DEMO_TEXT
    middle = got["events"][len(got["events"]) // 2][0]
    resumed = follow(node_app, f"{url}?last_event_id={middle}")
    assert all(event_id > middle for event_id, _, _ in resumed["events"])
    assert resumed["events"][-1][1] == "done"
    end = follow(node_app, f"{url}?last_event_id={got['events'][-1][0]}")
    assert end == {"events": [], "closed": True, "status": 204}
