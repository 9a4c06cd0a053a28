"""Several workers in one process (fast tier): apps joined by the in-memory shared backend
(:class:`MemoryHub`), as Redis joins worker processes, read through Flask's test client.

What the views answer for a stream run by another worker (read, resume, status, cancel), and
the limits that hold across workers, without Redis or a server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from flask.testing import FlaskClient

from sse_blueprint import SSE, ProducerContext, SQLStore
from sse_blueprint.backends.memory import MemoryBackend, MemoryHub
from tests.helpers.sse_parser import ParsedEvent, SSEParser, Transcript

WORDS = [f"w{i} " for i in range(40)]


def make_sse(gate: gevent.event.Event) -> SSE:
    sse = SSE()

    @sse.producer("words")
    def words(ctx: ProducerContext) -> dict[str, Any]:
        with ctx.block("text") as block:
            for n, word in enumerate(WORDS):
                if n == 20:
                    gate.wait()  # the test opens it: half the turn before, half after
                block.write(word)
                ctx.sleep(0)
        ctx.send("usage", {"output_tokens": len(WORDS)})
        return {"words": len(WORDS)}

    @sse.producer("forever")
    def forever(ctx: ProducerContext) -> None:
        while True:
            ctx.text(0, ".")
            ctx.sleep(0.01)

    return sse


@pytest.fixture
def workers(tmp_path: Any) -> Iterator[tuple[FlaskClient, FlaskClient, gevent.event.Event]]:
    """Two workers (apps) on one hub and one database; a small buffer, so that the turn is
    trimmed and resumes need the store."""
    hub = MemoryHub()
    store = SQLStore(f"sqlite:///{tmp_path}/turns.sqlite3")
    gate = gevent.event.Event()
    clients = []
    for _ in range(2):
        app = Flask(__name__)
        app.config.update(SSE_BUFFER_SIZE=8, SSE_MAX_CLIENTS_PER_ADDRESS=3)
        make_sse(gate).init_app(app, store=store, backend=MemoryBackend(hub))
        clients.append(app.test_client())
    yield clients[0], clients[1], gate
    gate.set()


def started(client: FlaskClient, producer: str) -> str:
    response = client.post("/api/streams", json={"producer": producer})
    assert response.status_code == 201, response.get_json()
    stream_id: str = response.get_json()["stream_id"]
    return stream_id


def read(client: FlaskClient, stream_id: str, last_id: int = 0, *, until: int = 0) -> list[Any]:
    """The events of one answer (to its end, or until ``until`` events came)."""
    response = client.get(
        f"/api/streams/{stream_id}", headers={"Last-Event-ID": str(last_id)}, buffered=False
    )
    assert response.status_code == 200, response.get_data()
    parser, events = SSEParser(), []
    try:
        for chunk in response.response:
            events += parser.feed(chunk if isinstance(chunk, bytes) else chunk.encode())
            if until and len(events) >= until:
                break
    finally:
        response.close()
    return events


def text(*answers: list[ParsedEvent]) -> str:
    """The text the contract's client rule rebuilds from these answers, in order."""
    transcript = Transcript()
    for events in answers:
        for e in events:
            transcript.apply(e.id, e.type, e.json())
    return transcript.blocks.get(0, "")


def status(client: FlaskClient, stream_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/api/streams/{stream_id}/status").get_json()
    return body


def wait_until_ended(client: FlaskClient, stream_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (now := status(client, stream_id))["state"] == "running":
        assert time.monotonic() < deadline
        gevent.sleep(0.01)
    return now


def test_a_stream_run_by_one_worker_is_read_whole_on_the_other(workers: Any) -> None:
    owner, other, gate = workers
    stream_id = started(owner, "words")
    first = read(other, stream_id, until=5)  # live, through the other worker's mirror
    gate.set()
    wait_until_ended(owner, stream_id)
    for client in (owner, other):
        events = read(client, stream_id)
        assert text(events) == "".join(WORDS)
        assert [e.type for e in events][-2:] == ["usage", "done"]
        ids = [e.id for e in events]
        assert ids == sorted(set(ids))
    assert text(first)
    assert "".join(WORDS).startswith(text(first))
    assert [e.id for e in first] == list(range(1, len(first) + 1))  # live: every event
    sse_of = other.application.extensions["sse_blueprint"].ext
    assert sse_of.registry(other.application).get(stream_id) is None  # not run there


def test_a_resume_on_the_other_worker_has_no_gap_and_no_duplicate(workers: Any) -> None:
    owner, other, gate = workers
    stream_id = started(owner, "words")
    before = read(owner, stream_id, until=12)  # the first half, from the owner
    gate.set()
    wait_until_ended(owner, stream_id)
    after = read(other, stream_id, before[-1].id)  # the rest, from the other worker
    assert after[0].id > before[-1].id
    assert text(before, after) == "".join(WORDS)
    assert after[-1].type == "done"


def test_status_and_cancel_from_the_other_worker(workers: Any) -> None:
    owner, other, _ = workers
    stream_id = started(owner, "forever")
    seen = status(other, stream_id)
    assert (seen["state"], seen["producer"]) == ("running", "forever")
    cancel = other.post(f"/api/streams/{stream_id}/cancel", json={})
    assert cancel.status_code == 202
    assert cancel.get_json()["state"] == "cancelled"
    ended = wait_until_ended(owner, stream_id)  # the owner's producer stopped
    assert ended["state"] == "cancelled"
    again = other.post(f"/api/streams/{stream_id}/cancel", json={})
    assert (again.status_code, again.get_json()["state"]) == (200, "cancelled")
    events = read(other, stream_id)
    assert events[-1].type == "cancelled"
    assert [e.id for e in events] == sorted({e.id for e in events})


def test_active_is_known_on_every_worker(workers: Any) -> None:
    owner, other, gate = workers
    stream_id = started(owner, "words")
    sse_of_other = other.application.extensions["sse_blueprint"].ext
    with other.application.app_context():
        assert sse_of_other.active([stream_id, "nope"]) == {stream_id: True, "nope": False}
    gate.set()
    wait_until_ended(owner, stream_id)
    with other.application.app_context():
        assert sse_of_other.active([stream_id]) == {stream_id: False}


def test_the_client_limit_per_address_holds_across_workers(workers: Any) -> None:
    owner, other, _ = workers
    stream_id = started(owner, "forever")
    url = f"/api/streams/{stream_id}"
    opened = [c.get(url, buffered=False) for c in (owner, other, other)]  # the limit: 3
    try:
        assert [r.status_code for r in opened] == [200, 200, 200]
        refused = owner.get(url, buffered=False)
        assert refused.status_code == 429
        assert "address" in refused.get_json()["error"]
    finally:
        for response in opened:
            response.close()
    back = other.get(url, buffered=False)  # the places came back
    try:
        assert back.status_code == 200
    finally:
        back.close()
    other.post(f"/api/streams/{stream_id}/cancel", json={})
