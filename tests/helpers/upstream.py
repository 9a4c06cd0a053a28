"""A model provider on loopback: scripted SSE in OpenAI's and Anthropic's wire formats.

Runs on threads in the pytest process (which is not gevent-patched). A test scripts what a model
name answers, request by request (an error status with a body, or frames with a pace, possibly
stalling after some), points the official SDK at :attr:`Upstream.url` and reads what arrived:
each request's body and headers, and when the client hung up on a stream (seen as end of file
on the socket, while the server waits or between frames).

Frames are made from the SDKs' own types (``model_validate`` then ``model_dump_json``), so they
are what the providers serialize.
"""

from __future__ import annotations

import dataclasses
import json
import select
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The key the tests give the SDKs: it must never show up in an event or a log line.
SECRET_KEY = "sk-test-SECRET-4f9c2a7d1e"


@dataclasses.dataclass
class Fail:
    """Answer with ``status`` and a JSON body that echoes the key, as real providers do."""

    status: int
    body: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "error": {"message": f"Incorrect API key provided: {SECRET_KEY}", "type": "invalid"}
        }
    )
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Frames:
    """Answer ``200 text/event-stream`` with ``frames``, one every ``interval`` seconds; with
    ``stall_after``, send that many and then nothing, until the client hangs up (at most 30 s)."""

    frames: Sequence[bytes]
    interval: float = 0.0
    stall_after: int | None = None


@dataclasses.dataclass
class Request:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    hung_up_at: float | None = None  # when the client closed a stream it had not finished


class Upstream:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Fail | Frames]] = {}
        self.since: dict[str, int] = {}  # where each model's script began in ``requests``
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                upstream._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, model: str, *answers: Fail | Frames) -> None:
        """What the next requests for ``model`` get, in order (the last answer repeats)."""
        with self.lock:
            self.scripts[model] = list(answers)
            self.since[model] = len(self.requests)

    def requests_for(self, model: str) -> list[Request]:
        """The requests for ``model`` since its script was set."""
        with self.lock:
            return self._requests_for(model)

    def _requests_for(self, model: str) -> list[Request]:
        since = self.since.get(model, 0)
        return [r for r in self.requests[since:] if r.body.get("model") == model]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        size = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(size) or b"{}")
        headers = {k.lower(): v for k, v in handler.headers.items()}
        request = Request(handler.path, body, headers, time.monotonic())
        with self.lock:
            model = str(body.get("model"))
            answers = self.scripts.get(model, [Fail(404)])
            count = len(self._requests_for(model))
            self.requests.append(request)
        answer = answers[min(count, len(answers) - 1)]
        if isinstance(answer, Fail):
            data = json.dumps(answer.body).encode()
            handler.send_response(answer.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in answer.headers.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()
        handler.wfile.flush()
        sock = handler.connection
        for n, frame in enumerate(answer.frames):
            if answer.stall_after is not None and n >= answer.stall_after:
                break
            if _hung_up(sock, answer.interval):
                request.hung_up_at = time.monotonic()
                return
            try:
                handler.wfile.write(frame)
                handler.wfile.flush()
            except OSError:
                request.hung_up_at = time.monotonic()
                return
        else:
            return  # all sent: the connection closes, which ends the body
        if _hung_up(sock, 30.0):
            request.hung_up_at = time.monotonic()


def _hung_up(sock: Any, wait: float) -> bool:
    """Wait up to ``wait`` seconds; True as soon as the peer has closed its end."""
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([sock], [], [], max(0.0, min(left, 0.02)))
        if readable:
            try:
                if sock.recv(1, 0x40) == b"":  # MSG_DONTWAIT
                    return True
            except BlockingIOError:
                pass
            except OSError:
                return True
        if left <= 0:
            return False


# -- frames, as the SDK types serialize them --------------------------------------------------


def _sse(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def chat_chunk(choices: list[dict[str, Any]] | None = None, **fields: Any) -> bytes:
    from openai.types.chat import ChatCompletionChunk

    raw = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": choices if choices is not None else [], **fields,
    }  # fmt: skip
    return _sse(ChatCompletionChunk.model_validate(raw).model_dump_json(exclude_unset=True))


def chat_delta(finish_reason: str | None = None, **delta: Any) -> bytes:
    return chat_chunk([{"index": 0, "delta": delta, "finish_reason": finish_reason}])


CHAT_DONE = b"data: [DONE]\n\n"


def chat_error(kind: str = "server_error") -> bytes:
    body = {"error": {"message": f"boom, key {SECRET_KEY}", "type": kind}}
    return _sse(json.dumps(body))


def responses_event(raw: dict[str, Any]) -> bytes:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    event = TypeAdapter(ResponseStreamEvent).validate_python(raw)
    return _sse(event.model_dump_json(exclude_unset=True), raw["type"])


def anthropic_event(raw: dict[str, Any]) -> bytes:
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    event = TypeAdapter(RawMessageStreamEvent).validate_python(raw)
    return _sse(event.model_dump_json(exclude_unset=True), raw["type"])


def anthropic_error(kind: str = "overloaded_error") -> bytes:
    body = {"type": "error", "error": {"type": kind, "message": f"Overloaded ({SECRET_KEY})"}}
    return _sse(json.dumps(body), "error")
