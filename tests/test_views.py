"""The views through Flask's test client: refusals, status and headers, no server (fast tier).

Streaming answers need gevent's server and are tested against gunicorn (``test_http.py``); what
a view answers before any streaming is tested here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import gevent
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.exceptions import Unauthorized

from sse_blueprint import SSE, InputError, ProducerContext, SQLStore
from sse_blueprint.engine import Unavailable
from sse_blueprint.web.views import CLIENT_VERSION


def refuse_shouting(input: Mapping[str, Any]) -> Mapping[str, Any]:
    if str(input.get("text", "")).isupper():
        raise InputError("no shouting")
    return input


@pytest.fixture
def client() -> Iterator[FlaskClient]:
    sse = SSE()

    @sse.producer("echo", validate=refuse_shouting)
    def echo(ctx: ProducerContext) -> dict[str, Any]:
        ctx.text(0, str(ctx.input.get("text", "")))
        return {}

    app = Flask(__name__)
    app.config.update(SSE_DATABASE_URL="sqlite://", SSE_CORS_ORIGINS="https://app.example")
    sse.init_app(app)
    with app.test_client() as test_client:
        yield test_client


def started(client: FlaskClient) -> str:
    response = client.post("/api/streams", json={"producer": "echo", "input": {"text": "hi"}})
    assert response.status_code == 201
    stream_id: str = response.get_json()["stream_id"]
    return stream_id


@pytest.mark.parametrize(
    ("kwargs", "status", "says"),
    [
        ({"data": "producer=echo", "content_type": "application/x-www-form-urlencoded"}, 415,
         "application/json"),
        ({"data": "{nope", "content_type": "application/json"}, 400, "JSON"),
        ({"json": {"producer": "nope"}}, 400, "producer"),
        ({"json": {"producer": "echo", "input": "text"}}, 400, "input"),
        ({"json": {"producer": "echo", "input": {"text": "HEY"}}}, 400, "no shouting"),
    ],
)  # fmt: skip
def test_a_refused_start_is_a_4xx_with_a_json_reason(
    client: FlaskClient, kwargs: dict[str, Any], status: int, says: str
) -> None:
    response = client.post("/api/streams", **kwargs)
    assert response.status_code == status
    assert says in response.get_json()["error"]


def test_unknown_streams_and_paths_are_json_404s(client: FlaskClient) -> None:
    for path in ("/api/streams/nope", "/api/streams/nope/status", "/api/streams/a/b/c"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "error" in response.get_json()
    assert client.post("/api/streams/nope/cancel", json={}).status_code == 404


def test_bad_positions_and_formats_are_400s(client: FlaskClient) -> None:
    stream_id = started(client)
    bad_id = client.get(f"/api/streams/{stream_id}", headers={"Last-Event-ID": "x"})
    assert bad_id.status_code == 400
    assert "Last-Event-ID" in bad_id.get_json()["error"]
    bad_format = client.get(f"/api/streams/{stream_id}?format=xml")
    assert bad_format.status_code == 400
    assert "ai-sdk" in bad_format.get_json()["error"]


def test_status_and_cancel_answer_json(client: FlaskClient) -> None:
    stream_id = started(client)
    status = client.get(f"/api/streams/{stream_id}/status").get_json()
    assert status["stream_id"] == stream_id
    assert status["state"] in ("running", "done")
    assert status["producer"] == "echo"
    cancel = client.post(f"/api/streams/{stream_id}/cancel", json={})
    assert cancel.status_code in (200, 202)
    assert cancel.get_json()["state"] in ("done", "cancelled")


def test_wrong_methods_are_json_405s_with_allow(client: FlaskClient) -> None:
    response = client.put("/api/streams", json={})
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert "error" in response.get_json()


def test_cors_headers_for_the_allowed_origin_only(client: FlaskClient) -> None:
    allowed = client.get("/api/streams/nope/status", headers={"Origin": "https://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.get("/api/streams/nope/status", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_the_client_module_is_served(client: FlaskClient) -> None:
    response = client.get(f"/api/client.js?v={CLIENT_VERSION}")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert b"export function applyEvent" in response.data
    assert "immutable" in response.headers["Cache-Control"]


def test_places_per_address_come_back_when_streams_end_or_never_start() -> None:
    sse = SSE()

    @sse.producer("echo", validate=refuse_shouting)
    def echo(ctx: ProducerContext) -> dict[str, Any]:
        ctx.text(0, "hi")
        return {}

    app = Flask(__name__)
    app.config.update(SSE_DATABASE_URL="sqlite://", SSE_MAX_STREAMS_PER_ADDRESS=2)
    sse.init_app(app)
    with app.test_client() as client:
        for _ in range(3):
            shouted = {"producer": "echo", "input": {"text": "HEY"}}
            assert client.post("/api/streams", json=shouted).status_code == 400  # takes none
        ids = [started(client), started(client)]
        refused = client.post("/api/streams", json={"producer": "echo", "input": {}})
        assert refused.status_code == 429
        for stream_id in ids:  # they end on their greenlets
            deadline = time.monotonic() + 10
            while client.get(f"/api/streams/{stream_id}/status").get_json()["state"] == "running":
                assert time.monotonic() < deadline
                gevent.sleep(0.01)
        assert [started(client), started(client)]  # both places are back


def test_an_app_view_of_its_own_gets_the_same_json_refusals() -> None:
    """``sse.stream_response`` in a view of the app's own: an unknown stream, a refused or an
    unauthenticated reader answer JSON (404, 403, 401), never an HTML 500."""
    sse = SSE()
    who: dict[str, str] = {"user": "ann"}

    @sse.producer("echo")
    def echo(ctx: ProducerContext) -> dict[str, Any]:
        return {}

    @sse.stream_metadata
    def owner(producer: str, input: Mapping[str, Any]) -> dict[str, Any]:
        return {"owner": who["user"]}

    @sse.authorize
    def only_the_owner(action: str, metadata: Mapping[str, Any]) -> bool:
        if not who["user"]:
            raise Unauthorized("log in first")
        return action == "create" or metadata.get("owner") == who["user"]

    app = Flask(__name__)
    app.config.update(SSE_DATABASE_URL="sqlite://")
    sse.init_app(app)

    @app.get("/chat/<stream_id>/stream")
    def mine(stream_id: str) -> Any:
        return sse.stream_response(stream_id, format="ai-sdk")

    with app.test_client() as client:
        missing = client.get("/chat/nope/stream")
        assert (missing.status_code, missing.get_json()) == (404, {"error": "stream not found"})
        stream_id = started(client)
        who["user"] = "bob"
        refused = client.get(f"/chat/{stream_id}/stream")
        assert refused.status_code == 403
        assert "not allowed" in refused.get_json()["error"]
        who["user"] = ""
        anonymous = client.get(f"/chat/{stream_id}/stream")
        assert (anonymous.status_code, anonymous.get_json()) == (401, {"error": "log in first"})


class AwayStore:
    """A store whose reads fail with ``error`` (its writes succeed)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def save(self, *args: Any) -> None:
        pass

    def load_stream(self, stream_id: str) -> Any:
        raise self.error

    def load_turn(self, stream_id: str, after_id: int) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "traceback"),
    [(Unavailable("database: connection refused"), False), (RuntimeError("a bug"), True)],
)
def test_a_store_that_cannot_answer_is_a_503_and_only_a_bug_logs_a_traceback(
    error: Exception, traceback: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The store says an outage with ``Unavailable`` (the web layer knows no driver): a 503 with
    Retry-After and a warning. Anything else it raises is a bug: still a 503, with a traceback."""
    sse = SSE()
    app = Flask(__name__)
    sse.init_app(app, store=AwayStore(error))
    with app.test_client() as client:
        for path in ("/api/streams/" + "a" * 22, "/api/streams/" + "a" * 22 + "/status"):
            response = client.get(path)
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "2"
            assert "unavailable" in response.get_json()["error"]
    logged = [
        r for r in caplog.records if r.name == "sse_blueprint" and "unavailable" in r.getMessage()
    ]
    assert logged
    assert all((r.exc_info is not None) is traceback for r in logged)


def test_an_unreachable_database_is_unavailable(tmp_path: Any) -> None:
    with pytest.raises(Unavailable) as raised:
        SQLStore(f"sqlite:///{tmp_path}/no/such/folder/turns.sqlite3")
    assert raised.value.__cause__ is not None  # the driver's own error, kept


def test_a_redis_that_cannot_be_reached_is_unavailable() -> None:
    from sse_blueprint.backends.redis.connection import RedisConnection

    conn = RedisConnection("redis://127.0.0.1:1/0", patience=0.3)  # nothing listens there
    with pytest.raises(Unavailable) as raised:
        conn.retrying(conn.redis.ping)
    assert raised.value.__cause__ is not None
