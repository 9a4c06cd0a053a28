"""Access control hooks: streams tied to the user who started them (401/403 JSON)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import LiveServer, read_stream


def call(method: str, url: str, user: str | None, **kwargs: Any) -> httpx.Response:
    headers = {"X-User": user} if user else {}
    if method == "POST":
        kwargs.setdefault("json", {})
    return httpx.request(method, url, headers=headers, timeout=30, **kwargs)


def test_streams_belong_to_the_user_who_started_them(server_factory: Any) -> None:
    secure: LiveServer = server_factory({}, app="tests.helpers.secure_app:app")
    url = f"{secure.url}/api/streams"
    body = {"producer": "echo", "input": {"text": "secret", "linger": 0.5}}
    anonymous = call("POST", url, None, json=body)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "log in first"
    assert call("POST", url, "mallory", json=body).status_code == 403
    created = call("POST", url, "alice", json=body)
    assert created.status_code == 201
    stream_id = created.json()["stream_id"]
    stream_url = f"{url}/{stream_id}"

    def refused(user: str | None, status: int) -> None:
        for method, path in (("GET", ""), ("GET", "/status"), ("POST", "/cancel")):
            response = call(method, stream_url + path, user)
            assert response.status_code == status, (method, path, user)
            assert "error" in response.json()

    refused("bob", 403)
    refused(None, 401)
    mine = read_stream(secure.url, stream_id, headers={"X-User": "alice"})
    assert mine.transcript.text() == "secret"
    status = call("GET", stream_url + "/status", "alice").json()
    assert status["metadata"] == {"owner": "alice"}
    # After a restart the stream lives only in the database: the same rules hold.
    secure.stop()
    secure.start()
    stream_url = f"{secure.url}/api/streams/{stream_id}"
    refused("bob", 403)
    again = read_stream(secure.url, stream_id, headers={"X-User": "alice"})
    assert again.transcript.text() == "secret"
    assert call("POST", stream_url + "/cancel", "alice").status_code == 200  # it had ended
