"""Turn blocks in a real database behind a real gunicorn: SQLite and PostgreSQL.

Late joiners catch up from the database, finished streams outlive the server process, a server
killed mid-stream leaves no stream "running forever", and a database outage loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import LIVE_APP, LiveServer, PostgresServer, read_stream, start_demo, wait_done
from tests.helpers.sse_parser import SSEParser, Transcript

PARAGRAPHS = [f"Paragraph {i}: " + "words and more words " * (3 + i % 3) + "\n\n" for i in range(8)]
LONG_TEXT = "".join(PARAGRAPHS) + "The end."


@dataclasses.dataclass
class Database:
    kind: str
    url: str
    outage: Callable[[], contextlib.AbstractContextManager[None]]

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params))
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "sse.sqlite3"

        @contextlib.contextmanager
        def sqlite_outage() -> Iterator[None]:
            # Another process holds the write lock: every write fails with "database is locked".
            conn = sqlite3.connect(path, isolation_level=None, timeout=30)
            conn.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
                conn.close()

        yield Database("sqlite", f"sqlite:///{path}", sqlite_outage)
        return
    pg: PostgresServer = request.getfixturevalue("postgres")
    name = "t_" + uuid.uuid4().hex[:12]
    pg.psql(f"CREATE DATABASE {name}")

    @contextlib.contextmanager
    def pg_outage() -> Iterator[None]:
        pg.stop("fast")  # the server is gone: connections fail at once
        try:
            yield
        finally:
            pg.start()

    yield Database("postgresql", pg.url.rsplit("/", 1)[0] + f"/{name}", pg_outage)


@pytest.fixture
def app_server(server_factory: Any, database: Database) -> Callable[[], LiveServer]:
    """Start the reference app on ``database`` (call again to start a fresh process)."""

    def start() -> LiveServer:
        server: LiveServer = server_factory(
            {"SSE_DATABASE_URL": database.url, "SSE_HEARTBEAT_INTERVAL": 1, "SSE_RETENTION": 2},
            app=LIVE_APP,
        )
        return server

    return start


def rebuild(events: list[Any], prefix: list[Any] | None = None) -> Transcript:
    client = Transcript()
    for event in [*(prefix or []), *events]:
        client.apply(event.id, event.type, event.json())
    return client


def test_late_joiner_after_trimmed_blocks_gets_catchup_then_live(
    app_server: Callable[[], LiveServer], database: Database
) -> None:
    server = app_server()
    stream_id = start_demo(server.url, LONG_TEXT, chunk_size=6, interval_ms=15)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until a few blocks are in the database
        blocks = database.query(
            "SELECT count(*) FROM sse_turn_blocks WHERE stream_id = :s", s=stream_id
        )[0][0]
        if blocks >= 3:
            break
        time.sleep(0.05)
    late = read_stream(server.url, stream_id, 1)
    kinds = [e.type for e in late.events]
    assert kinds[0] == "turnblock_catchup"
    assert kinds.count("turnblock_catchup") >= 3
    assert "text_delta" in kinds  # and then it follows live
    assert late.transcript.text() == LONG_TEXT
    ids = [e.id for e in late.events]
    assert ids == sorted(set(ids))
    # The catch-up ids are resumable: reconnecting from each gives the same text.
    for event in late.events:
        if event.type == "turnblock_catchup":
            seen = [e for e in late.events if e.id <= event.id]
            rest = read_stream(server.url, stream_id, event.id)
            client = rebuild(rest.events, seen)
            assert client.text() == LONG_TEXT
            assert len(client.delta_ids) == len(set(client.delta_ids))


def test_finished_stream_is_served_from_the_database_after_a_restart(
    app_server: Callable[[], LiveServer],
) -> None:
    first = app_server()
    stream_id = start_demo(first.url, LONG_TEXT, chunk_size=50, interval_ms=0)
    live = read_stream(first.url, stream_id)
    assert live.transcript.text() == LONG_TEXT
    terminal_id = live.events[-1].id
    time.sleep(0.5)  # the final write is in the background
    first.stop()
    second = app_server()  # a new process: nothing in memory
    replayed = read_stream(second.url, stream_id)
    assert replayed.events[0].type == "start"
    assert replayed.events[-1].type == "done"
    assert replayed.events[-1].id == terminal_id
    assert replayed.events[-1].json() == live.events[-1].json()
    assert replayed.transcript.text() == LONG_TEXT
    assert replayed.raw.startswith(b"retry: ")
    status = httpx.get(f"{second.url}/api/streams/{stream_id}/status").json()
    assert status["state"] == "done"
    assert status["last_event_id"] == terminal_id
    held = httpx.get(
        f"{second.url}/api/streams/{stream_id}", headers={"Last-Event-ID": str(terminal_id)}
    )
    assert held.status_code == 204
    # Resuming from every id of the original stream, against the new process, is exact.
    for k in range(0, terminal_id, 3):
        client = rebuild(read_stream(second.url, stream_id, k).events, live.events[:k])
        assert client.text() == LONG_TEXT, k
    cancel = httpx.post(f"{second.url}/api/streams/{stream_id}/cancel", json={})
    assert cancel.status_code == 200
    assert cancel.json()["state"] == "done"


def test_stream_of_a_killed_server_ends_as_producer_lost(
    app_server: Callable[[], LiveServer],
) -> None:
    first = app_server()
    stream_id = start_demo(first.url, LONG_TEXT, chunk_size=4, interval_ms=20)
    partial = read_stream(first.url, stream_id, stop_after=120)
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)  # no goodbye, no final write
    first.stop()  # it has exited: stop() only waits for it
    second = app_server()
    resumed = read_stream(second.url, stream_id, partial.events[-1].id)
    assert resumed.events[-1].type == "error"
    assert resumed.events[-1].json()["message"] == "producer lost"
    assert resumed.events[-1].id > partial.events[-1].id
    status = httpx.get(f"{second.url}/api/streams/{stream_id}/status").json()
    assert status["state"] == "error"
    client = rebuild(resumed.events, partial.events)
    assert LONG_TEXT.startswith(client.text())  # what was produced, never more or garbled
    fresh = read_stream(second.url, stream_id)
    assert LONG_TEXT.startswith(fresh.transcript.text())
    assert fresh.events[-1].type == "error"


def test_database_outage_during_persist_loses_nothing(
    app_server: Callable[[], LiveServer], database: Database
) -> None:
    server = app_server()
    with database.outage():
        stream_id = start_demo(server.url, LONG_TEXT, chunk_size=8, interval_ms=10)
        live = read_stream(server.url, stream_id, timeout=60)  # served from the buffer
        assert live.transcript.text() == LONG_TEXT
        late = read_stream(server.url, stream_id, 1, timeout=60)
        assert rebuild(late.events, live.events[:1]).text() == LONG_TEXT
        time.sleep(6 if database.kind == "sqlite" else 1)  # a write attempt times out and fails
    assert re.search(r"persisting \d+ block\(s\) failed", server.log())
    deadline = time.monotonic() + 30
    state: list[Any] = []
    while time.monotonic() < deadline:  # the retries get through once the database is back
        with contextlib.suppress(sa.exc.OperationalError):
            state = database.query("SELECT state FROM sse_streams WHERE id = :s", s=stream_id)
            if state and state[0][0] == "done":
                break
        time.sleep(0.2)
    assert state
    assert state[0][0] == "done"
    assert wait_done(server.url, stream_id)["state"] == "done"
    server.stop()
    again = app_server()
    replayed = read_stream(again.url, stream_id)
    assert replayed.transcript.text() == LONG_TEXT
    assert replayed.events[-1].type == "done"


def test_a_reader_that_needs_the_database_while_it_is_down_gets_503(
    server_factory: Any, postgres: PostgresServer
) -> None:
    """A live stream whose first blocks are only in the database: a reader from the start while
    PostgreSQL is down is told to retry (503 + Retry-After), not given a 200 with nothing in it;
    once the database is back the same request gets the whole turn."""
    name = "t_" + uuid.uuid4().hex[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    server = server_factory({"SSE_DATABASE_URL": url}, app=LIVE_APP)
    text = "".join(PARAGRAPHS * 3)
    stream_id = start_demo(server.url, text, chunk_size=3, interval_ms=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until a reader from the start needs the database
        probe = read_stream(server.url, stream_id, 0, stop_after=2)
        if [e.type for e in probe.events] == ["start", "turnblock_catchup"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the buffer was never trimmed")
    postgres.stop("fast")
    try:
        down = httpx.get(f"{server.url}/api/streams/{stream_id}", timeout=30)
        assert down.status_code == 503
        assert down.headers["retry-after"]
        assert "error" in down.json()
    finally:
        postgres.start()
    after = read_stream(server.url, stream_id, 0, timeout=60)
    assert after.transcript.text() == text
    assert after.transcript.terminal == "done"


def _follow_until_cut(
    base: str, stream_id: str, progress: list[int] | None = None, slot: int = 0
) -> list[Any]:
    """Read a stream until it ends or the server dies; the events that arrived whole (their
    count so far in ``progress[slot]``)."""
    parser, events = SSEParser(), []
    url = f"{base}/api/streams/{stream_id}"
    with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as response:
        for chunk in response.iter_raw():
            events += parser.feed(chunk)
            if progress is not None:
                progress[slot] = len(events)
    return events


def test_durable_delivery_gives_everyone_the_same_turn_after_kill_9(
    server_factory: Any, database: Database
) -> None:
    """SSE_DELIVERY = "durable": a reader gets an event only once the database has it. The
    worker is killed mid-stream (no goodbye); readers resume on a restarted server with their
    last ids and all end with exactly the turn that a reader who comes later gets."""
    config = {"SSE_DATABASE_URL": database.url, "SSE_DELIVERY": "durable"}
    first = server_factory(config, app=LIVE_APP)
    stream_id = start_demo(first.url, LONG_TEXT, chunk_size=3, interval_ms=10)
    progress = [0, 0, 0]
    with ThreadPoolExecutor(3) as pool:
        readers = [
            pool.submit(_follow_until_cut, first.url, stream_id, progress, n) for n in range(3)
        ]
        deadline = time.monotonic() + 30  # mid-stream: every reader has some of it (however
        while min(progress) <= 10 and time.monotonic() < deadline:  # busy the machine is)
            time.sleep(0.02)
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)
        seen = [r.result(timeout=30) for r in readers]
    first.stop()
    assert all(len(events) > 10 for events in seen)
    second = server_factory(config, app=LIVE_APP)
    fresh = read_stream(second.url, stream_id)
    assert fresh.events[-1].type == "error"
    assert fresh.events[-1].json()["message"] == "producer lost"
    assert LONG_TEXT.startswith(fresh.transcript.text())
    for events in seen:
        rest = read_stream(second.url, stream_id, events[-1].id)
        client = rebuild(rest.events, events)
        assert client.text() == fresh.transcript.text()  # nobody holds text the others lack
        ids = [e.id for e in [*events, *rest.events]]
        assert ids == sorted(set(ids))
