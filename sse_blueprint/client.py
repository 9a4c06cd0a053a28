"""A client that makes the resume invariant effortless (``pip install sse-blueprint[client]``).

    from sse_blueprint.client import StreamClient

    client = StreamClient("http://127.0.0.1:8000")
    reader = client.start("demo", {"text": "Hello.\\n\\nWorld!", "interval_ms": 50})
    for event in reader:                       # reconnects by itself, never repeats a delta
        if event.event == "text_delta":
            print(event.data["text"], end="", flush=True)
    print(reader.state, reader.text() == "Hello.\\n\\nWorld!")

The reader keeps the last event id and reconnects with it after network errors, after an end of
response without a terminal event (a server restart, or a cut for lagging), honouring the server's
``retry:`` hint, with exponential backoff and full jitter. It stops at the terminal event
(``done``/``error``/``cancelled``; see :attr:`StreamReader.state`) and raises
:class:`StreamFinished` (204), :class:`StreamNotFound` (404) or :class:`RequestRejected` (other
4xx). A :class:`CircuitBreaker` shared per base URL stops hammering a server that is down.

SSE is parsed by httpx-sse. One divergence of httpx-sse from the spec is corrected here: it
dispatches an empty event on the blank line after a comment or ``retry:``; events without data are
ignored, as the WHATWG rules say.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
from httpx_sse import EventSource

__all__ = [
    "Backoff",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientError",
    "ClientEvent",
    "Metrics",
    "RequestRejected",
    "RetriesExhausted",
    "StreamClient",
    "StreamFinished",
    "StreamNotFound",
    "StreamReader",
    "main",
]

TERMINAL = frozenset({"done", "error", "cancelled"})


class ClientError(Exception):
    """Base of the client's exceptions."""


class StreamNotFound(ClientError):
    """404: the server knows no such stream."""


class StreamFinished(ClientError):
    """204: the stream has ended and this reader already holds its terminal event."""


class RequestRejected(ClientError):
    """Another 4xx: the request itself is wrong (bad input, unknown producer, refused)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class CircuitOpenError(ClientError):
    """The breaker for this server is open: too many failures in a row."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"circuit open; next try in {retry_after:.1f}s")
        self.retry_after = retry_after


class RetriesExhausted(ClientError):
    """Gave up after ``max_retries`` failed attempts in a row."""


@dataclasses.dataclass(frozen=True)
class ClientEvent:
    id: int
    event: str
    data: dict[str, Any]


@dataclasses.dataclass
class Metrics:
    events: int = 0
    reconnects: int = 0  # new connections after the first
    retries: int = 0  # failed attempts (network errors, 5xx, open breaker)
    bytes: int = 0
    time_to_first_event: float | None = None


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff, full jitter: attempt ``n`` waits ``uniform(0, min(cap, base * 2**n))``.

    ``base`` is replaced by the server's ``retry:`` hint once one has been seen.
    """

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random, hint: float | None = None) -> float:
        base = hint if hint is not None else self.base
        return rng.uniform(0, min(self.cap, base * (2 ** max(attempt, 0))))


class CircuitBreaker:
    """Closed → (``threshold`` failures in a row) → open → (``cooldown`` s) → half-open.

    Half-open lets one attempt through: success closes the breaker, failure opens it again.
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.state = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()

    def before(self) -> None:
        """Raise :class:`CircuitOpenError` unless an attempt may go now."""
        with self._lock:
            if self.state == "open":
                waited = self.clock() - self._opened_at
                if waited < self.cooldown:
                    raise CircuitOpenError(self.cooldown - waited)
                self.state = "half-open"
            elif self.state == "half-open":
                # One trial at a time; others wait as if open.
                raise CircuitOpenError(0.0)

    def success(self) -> None:
        with self._lock:
            self.state = "closed"
            self.failures = 0

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state == "half-open" or self.failures >= self.threshold:
                self.state = "open"
                self._opened_at = self.clock()

    def release(self) -> None:
        """An attempt ended without a verdict (e.g. a 4xx): let the next one try."""
        with self._lock:
            if self.state == "half-open":
                self.state = "closed"
                self.failures = 0


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(base_url: str, **options: Any) -> CircuitBreaker:
    """The breaker shared by every client of ``base_url`` in this process."""
    key = base_url.rstrip("/")
    with _breakers_lock:
        if key not in _breakers:
            _breakers[key] = CircuitBreaker(**options)
        return _breakers[key]


class StreamClient:
    """Starts and opens streams of one server (``base_url`` plus the blueprint's ``prefix``)."""

    def __init__(
        self,
        base_url: str,
        *,
        prefix: str = "/api",
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        breaker: CircuitBreaker | None = None,
        max_retries: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.prefix = prefix
        # The read timeout only has to outlast the server's heartbeat interval.
        self.http = http or httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0))
        self.backoff = backoff or Backoff()
        self.breaker = breaker or breaker_for(self.base_url)
        self.max_retries = max_retries
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.clock = clock

    def url(self, path: str) -> str:
        return f"{self.base_url}{self.prefix}{path}"

    def start(self, producer: str, input: Mapping[str, Any] | None = None) -> StreamReader:
        """``POST /streams`` and return a reader of the new stream."""
        self.breaker.before()
        try:
            response = self.http.post(
                self.url("/streams"), json={"producer": producer, "input": dict(input or {})}
            )
        except httpx.TransportError:
            self.breaker.failure()
            raise
        if response.status_code >= 500:
            self.breaker.failure()
            response.raise_for_status()
        self.breaker.success()
        _raise_for_4xx(response)
        return self.open(response.json()["stream_id"])

    def open(self, stream_id: str, last_event_id: int = 0) -> StreamReader:
        """A reader of an existing stream, starting after ``last_event_id``."""
        return StreamReader(self, stream_id, last_event_id)

    def status(self, stream_id: str) -> dict[str, Any]:
        return self._call("GET", f"/streams/{stream_id}/status")

    def cancel(self, stream_id: str) -> dict[str, Any]:
        return self._call("POST", f"/streams/{stream_id}/cancel", {})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.request(method, self.url(path), json=body)
        _raise_for_4xx(response)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for_4xx(response: httpx.Response) -> None:
    """Raise the client's exception for a 204 or a 4xx; return for anything else."""
    status = response.status_code
    if status == 204:
        raise StreamFinished("the stream has ended; nothing after the last event id")
    if 400 <= status < 500:
        try:
            message = str(response.json().get("error", response.text))
        except ValueError:
            message = response.text
        if status == 404:
            raise StreamNotFound(message)
        raise RequestRejected(status, message)


class StreamReader:
    """Iterate to get the stream's events, with reconnects; rebuilds the text as it goes."""

    def __init__(self, client: StreamClient, stream_id: str, last_event_id: int = 0) -> None:
        self.client = client
        self.stream_id = stream_id
        self.last_event_id = last_event_id
        self.metrics = Metrics()
        self.terminal: ClientEvent | None = None
        #: The turn's blocks by number: ``{"kind", "meta", "content", "complete"}``.
        self.turn: dict[int, dict[str, Any]] = {}
        #: App events (citations, usage, ...) in order, and the newest of each name.
        self.events: list[ClientEvent] = []
        self.latest: dict[str, ClientEvent] = {}
        self.retry_hint: float | None = None  # seconds, from the server's ``retry:``
        self._connections = 0

    @property
    def state(self) -> str:
        """``running`` until the terminal event, then ``done``, ``error`` or ``cancelled``."""
        return self.terminal.event if self.terminal else "running"

    @property
    def blocks(self) -> dict[int, str]:
        """Each block's content so far, by number."""
        return {index: block["content"] for index, block in self.turn.items()}

    def text(self) -> str:
        """The text so far: the ``text`` blocks' content in order (reasoning, tool calls and
        other kinds are in :attr:`turn`)."""
        turn = self.turn
        return "".join(turn[k]["content"] for k in sorted(turn) if turn[k]["kind"] == "text")

    def apply(self, event: ClientEvent) -> None:
        """The contract's rule for one event: blocks start, grow, end or are replaced whole."""
        name, data = event.event, event.data
        if name == "block_start":
            self.turn[data["block"]] = {
                "kind": data["kind"], "meta": dict(data["meta"]), "content": "", "complete": False
            }  # fmt: skip
        elif name in ("text_delta", "block_end"):
            block = self.turn.setdefault(
                data["block"], {"kind": "text", "meta": {}, "content": "", "complete": False}
            )
            if name == "text_delta":
                block["content"] += data["text"]
            else:
                block["meta"].update(data["meta"])
                block["complete"] = True
        elif name == "turnblock_catchup":
            self.turn[data["block"]] = {
                key: data[key] for key in ("kind", "meta", "content", "complete")
            }
        elif name not in TERMINAL and name != "start":
            self.events.append(event)
            self.latest[name] = event

    def __iter__(self) -> Iterator[ClientEvent]:
        client = self.client
        started = client.clock()
        failures = 0
        while self.terminal is None:
            try:
                client.breaker.before()
            except CircuitOpenError as exc:
                failures = self._failed(failures, exc, wait=max(exc.retry_after, 0.05))
                continue
            try:
                got_any = False
                for event in self._connect():
                    if not got_any:
                        got_any = True
                        failures = 0
                    if self.metrics.time_to_first_event is None:
                        self.metrics.time_to_first_event = client.clock() - started
                    yield event
                    if event.event in TERMINAL:
                        return
            except (httpx.TransportError, _ServerError) as exc:
                client.breaker.failure()
                failures = self._failed(failures, exc)
                continue
            # The response ended without a terminal event (a cut, a restart). After progress,
            # reconnect after the server's ``retry:`` hint, as EventSource does; an end with no
            # event at all counts as a failure and backs off.
            if got_any:
                client.sleep(
                    self.retry_hint if self.retry_hint is not None else client.backoff.base
                )
            else:
                failures = self._failed(failures, ClientError("response ended before any event"))

    def _failed(self, failures: int, exc: Exception, wait: float | None = None) -> int:
        self.metrics.retries += 1
        failures += 1
        limit = self.client.max_retries
        if limit is not None and failures > limit:
            raise RetriesExhausted(f"{failures - 1} attempts failed; last: {exc!r}") from exc
        client = self.client
        client.sleep(
            wait
            if wait is not None
            else client.backoff.delay(failures, client.rng, self.retry_hint)
        )
        return failures

    def _connect(self) -> Iterator[ClientEvent]:
        client = self.client
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.last_event_id:
            headers["Last-Event-ID"] = str(self.last_event_id)
        if self._connections:
            self.metrics.reconnects += 1
        self._connections += 1
        url = client.url(f"/streams/{self.stream_id}")
        with client.http.stream("GET", url, headers=headers) as response:
            counted = 0
            try:
                if response.status_code >= 500:
                    raise _ServerError(response.status_code)
                if response.status_code != 200:
                    response.read()
                    client.breaker.release()
                    _raise_for_4xx(response)  # always raises: 204 or 4xx here
                client.breaker.success()
                for sse in EventSource(response).iter_sse():
                    if sse.retry is not None:
                        self.retry_hint = sse.retry / 1000
                    if not sse.data:
                        continue  # not an event (see the module docstring)
                    event = ClientEvent(int(sse.id), sse.event, json.loads(sse.data))
                    if event.id <= self.last_event_id:
                        continue  # never hand out the same id twice
                    self.last_event_id = event.id
                    self.metrics.events += 1
                    self.apply(event)
                    if event.event in TERMINAL:
                        self.terminal = event
                    self.metrics.bytes += response.num_bytes_downloaded - counted
                    counted = response.num_bytes_downloaded
                    yield event
            finally:
                self.metrics.bytes += response.num_bytes_downloaded - counted


class _ServerError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"server error {status}")
        self.status = status


# -- sse-tail ----------------------------------------------------------------------------------

EXIT_DONE, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED, EXIT_NOT_FOUND, EXIT_UNREACHABLE = (
    0,
    1,
    2,
    3,
    4,
    5,
)
EXIT_PIPE_CLOSED = 141  # as a shell tool killed by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """``sse-tail``: print a stream's text as it arrives; survive disconnects.

    Exit status: 0 done, 1 the stream ended with an error, 2 bad usage or request, 3 cancelled,
    4 no such stream, 5 server unreachable (at once if it never answered; after
    ``--max-retries`` failed reconnects if it went away), 141 the output was closed (``| head``).
    """
    parser = argparse.ArgumentParser(
        prog="sse-tail", description="Follow an sse-blueprint stream and print its text."
    )
    parser.add_argument("url", help="a stream URL (…/api/streams/ID), or the server's base URL")
    parser.add_argument("--start", metavar="PRODUCER", help="start a stream of this producer")
    parser.add_argument("--input", default="{}", help="JSON input for --start")
    parser.add_argument("--last-event-id", type=int, default=0, help="resume after this id")
    parser.add_argument("--json", action="store_true", help="print raw events, one JSON per line")
    parser.add_argument("--max-retries", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        input = json.loads(args.input)
    except ValueError as exc:
        parser.error(f"--input is not JSON ({exc})")
    if not isinstance(input, dict):
        parser.error('--input must be a JSON object, e.g. \'{"text": "hi"}\'')
    out = sys.stdout
    try:
        if args.start:
            client = StreamClient(args.url, max_retries=args.max_retries)
            reader = client.start(args.start, input)
            print(f"stream {reader.stream_id}", file=sys.stderr)
        else:
            base, sep, stream_id = args.url.rstrip("/").rpartition("/streams/")
            if not sep or not stream_id:
                parser.error("url must end in /streams/<id> (or use --start)")
            root, _, prefix = base.rpartition("/")
            client = StreamClient(root, prefix="/" + prefix, max_retries=args.max_retries)
            with contextlib.suppress(httpx.HTTPStatusError):  # (a 5xx: retried below)
                client.status(stream_id)  # a server that never answers fails now, not later
            reader = client.open(stream_id, args.last_event_id)
        shown = ""
        for event in reader:
            if args.json:
                out.write(json.dumps(dataclasses.asdict(event), ensure_ascii=False) + "\n")
            else:
                text = reader.text()
                if text.startswith(shown):
                    out.write(text[len(shown) :])
                else:  # a catch-up replaced something already printed
                    out.write("\n" + text)
                shown = text
            out.flush()
        if not args.json:
            out.write("\n")
            out.flush()
    except StreamNotFound as exc:
        print(f"sse-tail: no such stream: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except StreamFinished:
        return EXIT_DONE
    except (RequestRejected, ValueError) as exc:
        print(f"sse-tail: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RetriesExhausted, CircuitOpenError, httpx.HTTPError) as exc:
        print(f"sse-tail: server unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output went away (``| head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return EXIT_PIPE_CLOSED
    state = reader.state
    if state == "error" and reader.terminal is not None:
        print(f"sse-tail: stream error: {reader.terminal.data.get('message')}", file=sys.stderr)
    return {"done": EXIT_DONE, "error": EXIT_ERROR, "cancelled": EXIT_CANCELLED}[state]


if __name__ == "__main__":
    sys.exit(main())
