"""Whole turns through a cutting proxy, on SQLite, PostgreSQL and Redis with two instances.

A ``script`` turn with every kind of block (reasoning, tool call with streamed JSON arguments,
tool result, text, an app kind) and every kind of app event (durable, latest, ephemeral) is read
by clients that apply the contract's rules across reconnects, through a proxy that cuts at random
byte offsets (an event must fit under the cut limit to ever arrive); then resumed from random
points after the stream finished (the buffer long trimmed) and again after every server
restarted. Each client must end with exactly the producer's blocks, every durable event once and
in order, the newest latest event of each name, and no event id twice. The expected turn is
computed from the steps, not by the library.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import (
    LIVE_APP,
    CuttingProxy,
    LiveServer,
    PostgresServer,
    RedisServer,
    start_stream,
    wait_done,
)
from tests.helpers.sse_parser import SSEParser, Transcript
from tests.test_redis import shared_config

ARGS = '{"query": "weather in Paris", "units": "metric", "days": [1, 2, 3]}'
STEPS: list[dict[str, Any]] = [
    {"event": "progress", "data": {"percent": 0}, "replay": "latest"},
    {"block": {"kind": "reasoning", "meta": {"effort": "low"}, "text": "Thinking it over. " * 12}},
    {"event": "typing", "data": {"who": "agent"}, "replay": "ephemeral"},
    {
        "block": {
            "kind": "tool_call",
            "meta": {"name": "weather", "call_id": "call_7"},
            "text": ARGS,
            "end_meta": {"input": {"query": "weather in Paris", "units": "metric"}},
        }
    },
    {"event": "progress", "data": {"percent": 40}, "replay": "latest"},
    {
        "block": {
            "kind": "tool_result",
            "meta": {"call_id": "call_7"},
            "text": '{"temp_c": 21, "sky": "clear \u2600"}',
        }
    },
    {"event": "citation", "data": {"index": 1, "url": "https://example.org/w"}},
    {"block": {"kind": "text", "meta": {}, "text": "It is 21 \u00b0C in Paris. " * 20}},
    {"event": "progress", "data": {"percent": 80}, "replay": "latest"},
    {"event": "citation", "data": {"index": 2, "url": "https://example.org/x"}},
    {"block": {"kind": "app.chart", "meta": {"type": "bar"}, "text": "[1, 2, 3]" * 10}},
    *[
        {"block": {"kind": "text", "meta": {"part": n}, "text": f"Day {n}: clear skies.\n\n" * 12}}
        for n in range(6)
    ],
    {"event": "usage", "data": {"input_tokens": 120, "output_tokens": 340}, "replay": "durable"},
    {"event": "progress", "data": {"percent": 100}, "replay": "latest"},
    {"event": "typing", "data": {"who": "nobody"}, "replay": "ephemeral"},
]
MODES = {"progress": "latest", "typing": "ephemeral", "citation": "durable", "usage": "durable"}


def expected_turn() -> tuple[dict[int, dict[str, Any]], list[tuple[str, Any]], dict[str, Any]]:
    """What the contract says a client ends with, from the steps alone."""
    blocks: dict[int, dict[str, Any]] = {}
    durable: list[tuple[str, Any]] = []
    latest: dict[str, Any] = {}
    for step in STEPS:
        if "block" in step:
            b = step["block"]
            blocks[len(blocks)] = {
                "kind": b["kind"],
                "meta": {**b["meta"], **b.get("end_meta", {})},
                "content": b["text"],
                "complete": True,
            }
        elif step.get("replay", "durable") == "durable":
            durable.append((step["event"], step["data"]))
        elif step["replay"] == "latest":
            latest[step["event"]] = step["data"]
    return blocks, durable, latest


class Follower:
    """A client that applies the contract across reconnects, to whichever server ``pick`` picks.

    It asserts on every event that its id is new (greater than every id it holds)."""

    def __init__(self, pick: Callable[[], str], stream_id: str, state: Transcript | None = None):
        self.pick = pick
        self.stream_id = stream_id
        self.state = state or Transcript()
        self.connections = 0
        self.finished = False

    def connect_once(self) -> None:
        self.connections += 1
        headers = {"Last-Event-ID": str(self.state.last_id)} if self.state.ids else {}
        parser = SSEParser()
        base = self.pick()
        here: list[int] = []  # this connection's ids (a duplicate's message tells them)
        try:
            with httpx.stream(
                "GET", f"{base}/api/streams/{self.stream_id}", headers=headers, timeout=20
            ) as response:
                if response.status_code == 204:
                    self.finished = True
                    return
                assert response.status_code == 200, response.status_code
                for chunk in response.iter_raw():
                    for event in parser.feed(chunk):
                        assert event.id > self.state.last_id, (
                            f"an event id arrived twice: {event.id} on connection"
                            f" {self.connections} to {base} with {headers}, after {here[-20:]}"
                        )
                        here.append(event.id)
                        self.state.apply(event.id, event.type, event.json())
                        if self.state.terminal:
                            self.finished = True
                            return
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
            pass  # a cut (or a server restarting): resume from the last id

    def run(self, max_connections: int = 3000) -> Follower:
        while not self.finished:
            assert self.connections < max_connections, "the client never got to the end"
            self.connect_once()
        return self


def assert_whole_turn(state: Transcript) -> None:
    blocks, durable, latest = expected_turn()
    assert state.turn == blocks
    got = [(name, data) for _, name, data in state.app_events if MODES[name] == "durable"]
    assert got == durable, "durable events: each exactly once, in order"
    assert {name: data for name, (_, data) in state.latest.items() if name in latest} == latest
    assert state.terminal == "done"
    assert state.ids == sorted(set(state.ids))


def state_at(full: Transcript, position: int) -> Transcript:
    """A client that had read ``full``'s events up to ``position`` (and then went away)."""
    part = Transcript()
    for event_id, name, data in full.events:
        if event_id <= position:
            part.apply(event_id, name, data)
    return part


def proxies_for(servers: list[LiveServer], seed: int) -> list[CuttingProxy]:
    return [
        CuttingProxy(s.url, seed=seed + i, max_bytes=2000, only=b"GET /api/streams/")
        for i, s in enumerate(servers)
    ]


def catchups_from_database(servers: list[LiveServer]) -> float:
    total = 0.0
    for server in servers:
        text = httpx.get(f"{server.url}/api/metrics").text
        for match in re.finditer(r'sse_catchups_total\{source="database"\} ([0-9.e+]+)', text):
            total += float(match.group(1))
    return total


def exercise(servers: list[LiveServer], restart: Callable[[], None], seed: int) -> int:
    """The whole scenario on ``servers``; returns how many cuts the proxies made."""
    rng = random.Random(seed)
    proxies = proxies_for(servers, seed)
    cuts = 0
    try:
        stream_id = start_stream(servers[0].url, "script", steps=STEPS, chunk_size=2, interval_ms=2)
        # Live: four clients through the cuts, each connection to a random instance.
        followers = [Follower(lambda: rng.choice(proxies).url, stream_id) for _ in range(4)]
        threads = [threading.Thread(target=f.run) for f in followers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for f in followers:
            assert f.finished
            assert_whole_turn(f.state)
            # The whole turn is more than the 2,000 bytes a proxied connection may carry: every
            # live reader was cut and resumed at least once, whatever the schedule.
            assert f.connections > 1, "a live reader was never cut"
        assert wait_done(servers[0].url, stream_id)["state"] == "done"
        # The resume points below are ids a client really held: the follower that held the
        # most. (How many a follower holds is the schedule's: each catch-up after a cut folds
        # blocks into one event. Each of its connections, cut after 2,000 bytes, brought at
        # least one new id, so dozens.) The turn itself is long whatever the schedule:
        full = max((f.state for f in followers), key=lambda state: len(state.ids))
        assert full.last_id > 50  # the terminal event's id: the events the producer sent
        # Finished and trimmed: resume from random points, still through the cuts.
        for position in rng.sample(full.ids[:-1], 15):
            resumed = Follower(lambda: rng.choice(proxies).url, stream_id, state_at(full, position))
            assert_whole_turn(resumed.run().state)
        # The client that holds the terminal event gets 204, with no event.
        done = Follower(lambda: servers[-1].url, stream_id, state_at(full, full.last_id))
        done.run()
        assert done.connections == 1
        assert done.state.ids == full.ids
        assert catchups_from_database(servers) > 0, "no resume ever needed the store"
        cuts += sum(p.cuts for p in proxies)
        for p in proxies:
            p.close()
        # Every server restarted: the turn comes from the database alone.
        restart()
        proxies = proxies_for(servers, seed + 100)
        for position in [0, *rng.sample(full.ids[:-1], 15)]:
            resumed = Follower(lambda: rng.choice(proxies).url, stream_id, state_at(full, position))
            assert_whole_turn(resumed.run().state)
        # NDJSON carries the same events as SSE.
        sse_read = Follower(lambda: servers[0].url, stream_id).run().state
        lines = httpx.get(f"{servers[-1].url}/api/streams/{stream_id}?format=ndjson").text
        ndjson = [json.loads(line) for line in lines.splitlines() if line]
        assert [(e["id"], e["event"], e["data"]) for e in ndjson] == sse_read.events
        cuts += sum(p.cuts for p in proxies)
    finally:
        for p in proxies:
            p.close()
    return cuts


TURN_CONFIG = {"SSE_BUFFER_SIZE": 8, "SSE_METRICS": True, "SSE_RETRY_MS": 100}


def restarter(servers: list[LiveServer]) -> Callable[[], None]:
    def restart() -> None:
        for server in servers:
            server.stop()
        for server in servers:
            server.start()

    return restart


def test_whole_turn_on_sqlite(server_factory: Any) -> None:
    server: LiveServer = server_factory(TURN_CONFIG, app=LIVE_APP)
    assert (
        exercise([server], restarter([server]), seed=11) > 0
    )  # (how many depends on the schedule)


def test_whole_turn_on_postgresql(server_factory: Any, postgres: PostgresServer) -> None:
    name = "t_" + re.sub(r"\W", "", str(random.random()))[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    server: LiveServer = server_factory({**TURN_CONFIG, "SSE_DATABASE_URL": url}, app=LIVE_APP)
    assert (
        exercise([server], restarter([server]), seed=12) > 0
    )  # (how many depends on the schedule)


def test_whole_turn_on_redis_with_two_instances(
    server_factory: Any, redis_server: RedisServer, postgres: PostgresServer
) -> None:
    config = {**shared_config(redis_server, postgres), **TURN_CONFIG}
    servers: list[LiveServer] = [server_factory(config, app=LIVE_APP, workers=2) for _ in range(2)]
    try:
        assert (
            exercise(servers, restarter(servers), seed=13) > 0
        )  # (how many depends on the schedule)
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize(
    "steps",
    [
        "not a list",
        [1],
        [{}],
        [{"block": {}, "event": "x"}],
        [{"block": {"kind": "Bad Kind"}}],
        [{"block": {"kind": "text", "text": 5}}],
        [{"block": {"kind": "text", "meta": []}}],
        [{"block": {"kind": "text", "end_meta": "x"}}],
        [{"event": ""}],
        [{"event": "done"}],
        [{"event": "text_delta", "data": {"block": 0, "text": "x"}}],
        [{"event": "a\nb"}],
        [{"event": "note", "data": [1]}],
        [{"event": "note", "replay": "sometimes"}],
    ],
)
def test_script_refuses_malformed_steps_with_400(server: LiveServer, steps: Any) -> None:
    response = httpx.post(
        f"{server.url}/api/streams", json={"producer": "script", "input": {"steps": steps}}
    )
    assert response.status_code == 400
    assert response.json()["error"]


def test_a_producer_past_its_bounds_ends_with_a_clear_error(server_factory: Any) -> None:
    server: LiveServer = server_factory({"SSE_MAX_DURABLE_EVENTS": 2}, app=LIVE_APP)
    notes = [{"event": "note", "data": {"n": n}} for n in range(3)]
    stream_id = start_stream(server.url, "script", steps=notes, interval_ms=0)
    assert wait_done(server.url, stream_id)["state"] == "error"
    state = Follower(lambda: server.url, stream_id).run().state
    assert [d for _, _, d in state.app_events] == [{"n": 0}, {"n": 1}]
    assert "SSE_MAX_DURABLE_EVENTS" in state.events[-1][2]["message"]
    server.stop()


def test_python_client_rebuilds_the_whole_turn_through_cuts(server_factory: Any) -> None:
    from sse_blueprint.client import StreamClient

    server: LiveServer = server_factory(TURN_CONFIG, app=LIVE_APP)
    proxy = CuttingProxy(server.url, seed=21, max_bytes=2000, only=b"GET /api/streams/")
    try:
        with StreamClient(proxy.url) as client:
            reader = client.start("script", {"steps": STEPS, "chunk_size": 2, "interval_ms": 1})
            ids = [event.id for event in reader]
        blocks, durable, latest = expected_turn()
        assert reader.state == "done"
        assert reader.turn == blocks
        assert [(e.event, e.data) for e in reader.events if MODES[e.event] == "durable"] == durable
        assert {k: e.data for k, e in reader.latest.items() if k in latest} == latest
        assert reader.text() == "".join(
            b["content"] for b in blocks.values() if b["kind"] == "text"
        )
        assert ids == sorted(set(ids))
        assert proxy.cuts >= 5
    finally:
        proxy.close()
        server.stop()
