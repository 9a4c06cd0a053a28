"""Request hygiene: what a request must pass before a view acts on it.

Holds the checks that keep hostile or broken requests from costing more than a 4xx: the JSON-only
rule for ``POST`` (cross-site request forgery), the ``Sec-Fetch-Site`` check, a deadline for
reading a body (``SSE_BODY_TIMEOUT``), malformed bodies (bad chunked framing, JSON nested past
the parser's depth), and JSON errors for requests that no view matched (unknown methods, merged
slashes). Each refusal is a :class:`RequestRefused`, which the web layer turns into a JSON answer.

Imports Flask/Werkzeug and gevent only; must not import the engine, storage or backends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Request, current_app
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

__all__ = [
    "RequestRefused",
    "check_post",
    "read_json_body",
    "routing_refusal",
]

JSON_MIMETYPE = "application/json"
#: Endpoints whose view only refuses (a 405 for a method, a 404 for a path) end with this.
REFUSAL_SUFFIX = "_refused"


class RequestRefused(Exception):
    """A request the blueprint answers with ``status`` and ``{"error": message}``.

    ``close`` asks that the connection be shut once the answer is sent: its request body was not
    (or could not be) read to the end, so nothing else can follow on it.
    """

    def __init__(
        self,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.close = close

    @classmethod
    def from_http(cls, exc: HTTPException) -> RequestRefused:
        """Werkzeug's ``abort`` (or a hook's ``Unauthorized``) as the blueprint's refusal."""
        return cls(exc.code or 500, exc.description or exc.name)


def check_post(request: Request, allowed_origins: tuple[str, ...]) -> None:
    """Refuse a ``POST`` a cross-site page could have sent without the user's say.

    A page on another site can send a form (``text/plain``, ``application/x-www-form-urlencoded``,
    ``multipart/form-data``) or a ``no-cors`` fetch with the user's cookies, but it cannot set
    ``Content-Type: application/json`` without a CORS preflight, which only origins in
    ``SSE_CORS_ORIGINS`` pass. Browsers also say where a request comes from in
    ``Sec-Fetch-Site``: ``cross-site`` is refused unless its ``Origin`` is allowed.
    """
    if request.mimetype != JSON_MIMETYPE:
        raise RequestRefused(415, "Content-Type must be application/json")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        origin = (request.headers.get("Origin") or "").rstrip("/")
        if "*" not in allowed_origins and origin not in allowed_origins:
            raise RequestRefused(403, "cross-site requests are not allowed (SSE_CORS_ORIGINS)")


def read_json_body(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The request's JSON object, read within ``timeout`` seconds and ``limit`` bytes."""
    # (A body too large is left to the server to drain, so the client can read the 413; gunicorn
    # bounds that by its keep-alive timeout.)
    if request.content_length is not None and request.content_length > limit:
        raise RequestRefused(413, f"request body is larger than {limit} bytes")
    try:
        with gevent.Timeout(timeout):
            raw = request.stream.read(limit + 1)
    except gevent.Timeout:
        raise RequestRefused(
            408, f"the request body did not arrive within {timeout:g} s", close=True
        ) from None
    except Exception:  # the server's parser: bad chunk sizes or terminators, a body cut short
        raise RequestRefused(400, "malformed request body", close=True) from None
    if len(raw) > limit:
        raise RequestRefused(413, f"request body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise RequestRefused(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise RequestRefused(400, "request body must be a JSON object")
    return body


def routing_refusal(request: Request) -> RequestRefused | None:
    """The JSON refusal for a request under the blueprint that no view matched, or None."""
    exc = request.routing_exception
    if exc is None:
        return None
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(_methods_served(request))
        return RequestRefused(
            405, f"method not allowed; use {allowed}", {"Allow": allowed} if allowed else {}
        )
    if isinstance(exc, (NotFound, RequestRedirect)):  # a redirect: "//" in the path
        return RequestRefused(404, "no such stream endpoint")
    return RequestRefused(exc.code or 400, exc.description or exc.name)


def _methods_served(request: Request) -> list[str]:
    """The methods a view (not a refusal) serves at this request's path."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    served = []
    for method in ("GET", "POST"):
        try:
            rule, _ = adapter.match(method=method, return_rule=True)
        except HTTPException:
            continue
        if not str(rule.endpoint).endswith(REFUSAL_SUFFIX):
            served.append(method)
    return served
