"""A small app with access control: a stream belongs to the user who started it (``X-User``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import Unauthorized

from sse_blueprint import SSE, ProducerContext

sse = SSE()


@sse.producer("echo")
def echo(ctx: ProducerContext) -> None:
    ctx.text(0, str(ctx.input.get("text", "")))
    ctx.sleep(float(ctx.input.get("linger", 0)))


def current_user() -> str | None:
    return request.headers.get("X-User")


@sse.stream_metadata
def owner(producer: str, input: Mapping[str, Any]) -> dict[str, Any]:
    return {"owner": current_user()}


@sse.authorize
def only_the_owner(action: str, metadata: Mapping[str, Any]) -> bool:
    if current_user() is None:
        raise Unauthorized("log in first")
    if action == "create":
        return current_user() != "mallory"
    return metadata.get("owner") == current_user()


app = Flask(__name__)
app.config.from_prefixed_env()
sse.init_app(app)


@app.get("/")
def index() -> str:
    return "ok"
