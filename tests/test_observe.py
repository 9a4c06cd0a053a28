"""Logs: with SSE_LOG_FORMAT = json every library line is a JSON object naming its stream."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import LIVE_APP, LiveServer, read_stream, start_stream, wait_done


def test_json_logs_carry_the_stream_id(server_factory: Any) -> None:
    server: LiveServer = server_factory(
        {"SSE_LOG_FORMAT": "json", "SSE_CLIENT_QUEUE": 16}, app=LIVE_APP
    )
    failed = start_stream(server.url, "fail")
    wait_done(server.url, failed)
    time.sleep(0.5)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    ours = [line for line in lines if line["logger"] == "sse_blueprint"]
    failure = [line for line in ours if "failed" in line["message"]]
    assert failure, ours
    assert failure[0]["stream_id"] == failed
    assert failure[0]["level"] == "error"
    assert "deliberate test failure" in failure[0]["exception"]
    assert all({"time", "level", "message", "stream_id", "pid"} <= set(line) for line in ours)
    result = read_stream(server.url, failed)
    assert result.events[-1].type == "error"
