"""The relay loop every provider shares: retries before the first token, safe errors, the result.

A relay opens an upstream stream through the provider's official SDK, hands each item to the
provider's translator (which writes blocks with the producer's context) and returns a
:class:`RelayResult`. Before anything reached the stream, a failed upstream is tried again, with
backoff and jitter, a bounded number of times; after that, a failure or a stall ends the stream
with ``error`` and a message that names what went wrong and nothing more: never the provider's
body or a key. Cancelling the stream raises :class:`~sse_blueprint.StreamClosed` where the relay
waits on the upstream socket; the SDK's stream is closed on the way out, which closes its
connection: the provider stops generating.

Imports no Flask, SQLAlchemy, gevent or provider SDK (errors are recognised by their module).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._backoff import Backoff
from ..engine import Block, ProducerContext, ProducerError, StreamClosed

__all__ = ["RelayResult", "ToolCall", "UpstreamFailed", "relay"]

log = logging.getLogger("sse_blueprint.relays")

#: Where the SDKs' and their transports' exceptions come from.
_UPSTREAM_MODULES = ("openai", "anthropic", "httpx", "httpx2", "httpcore", "httpcore2", "h11")
_SAFE_CODE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0


class UpstreamFailed(Exception):
    """The upstream's stream said it failed (an error frame, ``response.failed``), or ended early.

    ``code`` is the provider's error type when it is a short identifier (``overloaded_error``),
    safe to show; the provider's message is never kept.
    """

    def __init__(self, code: str | None = None, *, retryable: bool = True) -> None:
        self.code = code if code and _SAFE_CODE.fullmatch(code) else None
        self.retryable = retryable
        super().__init__(self.code or "upstream failed")


@dataclass
class ToolCall:
    """A tool call the model made: ``input`` is the parsed arguments (None if not JSON)."""

    id: str
    name: str
    arguments: str
    input: Any = None


@dataclass
class RelayResult(Mapping[str, Any]):
    """What an upstream turn ended with. As a mapping it is the ``done`` data, so a producer can
    ``return relay_...(ctx, client, ...)``; for a tool loop, read :attr:`tool_calls` and append
    :attr:`assistant` (the reply in the provider's own input shape) to the conversation."""

    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    id: str | None = None
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    assistant: Any = None

    def _done(self) -> dict[str, Any]:
        done = {"finish_reason": self.finish_reason, "usage": self.usage or None}
        done |= {"model": self.model, "response_id": self.id}
        return {k: v for k, v in done.items() if v is not None}

    def __getitem__(self, key: str) -> Any:
        return self._done()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._done())

    def __len__(self) -> int:
        return len(self._done())


class Blocks:
    """The blocks a translator has open, by a key of its own (a content index, a tool index)."""

    def __init__(self, ctx: ProducerContext) -> None:
        self.ctx = ctx
        self.open: dict[object, Block] = {}
        self.started = False  # something reached the stream: no retry from here on
        self.texts: dict[str, list[str]] = {"text": [], "reasoning": []}

    def start(self, key: object, kind: str, meta: Mapping[str, Any] | None = None) -> Block:
        self.end(key)
        self.started = True
        block = self.open[key] = self.ctx.block(kind, _present(meta))
        return block

    def write(self, key: object, kind: str, text: str) -> None:
        if not text:
            return
        block = self.open.get(key)
        if block is None:
            block = self.start(key, kind)
        block.write(text)
        if block.kind in self.texts:
            self.texts[block.kind].append(text)

    def end(self, key: object, meta: Mapping[str, Any] | None = None) -> None:
        block = self.open.pop(key, None)
        if block is not None:
            block.end(_present(meta))

    def finish(self, result: RelayResult) -> RelayResult:
        """End the blocks still open; ``result`` gets the turn's text and reasoning."""
        for key in list(self.open):
            self.end(key)
        result.text = "".join(self.texts["text"])
        result.reasoning = "".join(self.texts["reasoning"])
        return result


def _present(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (meta or {}).items() if v is not None}


def parse_arguments(arguments: str) -> tuple[Any, dict[str, Any]]:
    """A tool call's arguments parsed, and the ``block_end`` meta that says so."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return None, {"input_error": "the arguments are not valid JSON"}
    return value, {"input": value}


class Translator(Protocol):
    """Turns one provider's stream items into blocks; made anew for every attempt."""

    blocks: Blocks

    def feed(self, item: Any) -> None: ...

    def finish(self) -> RelayResult: ...


def relay(
    ctx: ProducerContext,
    client: Any,
    create: Callable[[Any], Callable[..., AbstractContextManager[Iterable[Any]]]],
    params: Mapping[str, Any],
    translator: Callable[[ProducerContext], Translator],
    *,
    retries: int,
    stall_timeout: float,
) -> RelayResult:
    """Run one upstream turn into the stream (see the module docstring): ``create(client)`` is
    the SDK method (``client.chat.completions.create``), called with ``stream=True`` and
    ``params`` on a copy of ``client`` with the SDK's retries off and ``stall_timeout``."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    method = create(client.with_options(max_retries=0, timeout=stall_timeout))
    api = str(getattr(translator, "api", "upstream"))  # for the log: "chat.completions"
    backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP, jitter=True)
    attempt = 0
    while True:
        turn = translator(ctx)
        try:
            with method(stream=True, **params) as upstream:
                for item in upstream:
                    turn.feed(item)
            return turn.finish()
        except StreamClosed:
            raise  # cancelled or timed out: the SDK stream was closed on the way out
        except Exception as exc:
            if not _is_upstream(exc):
                raise
            reason = _describe(exc, turn.blocks.started, stall_timeout)
            if turn.blocks.started or attempt >= retries or not _retryable(exc):
                log.warning(
                    "relay %s: %s; ending the stream (attempt %d of %d)",
                    api, reason, attempt + 1, retries + 1,
                    extra={"stream_id": ctx.stream_id},
                )  # fmt: skip
                raise ProducerError(reason) from None
            delay = max(backoff.delay(), _retry_after(exc))
            log.warning(
                "relay %s: %s; retrying in %.1f s (attempt %d of %d)",
                api, reason, delay, attempt + 1, retries + 1,
                extra={"stream_id": ctx.stream_id},
            )  # fmt: skip
            ctx.sleep(delay)
            attempt += 1


def _is_upstream(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamFailed | OSError | TimeoutError | json.JSONDecodeError):
        return True
    return any((c.__module__ or "").split(".")[0] in _UPSTREAM_MODULES for c in type(exc).__mro__)


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) and 100 <= status < 600 else None


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or any("Timeout" in c.__name__ for c in type(exc).__mro__)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamFailed):
        return exc.retryable
    status = _status(exc)
    if status is None or status == 200:  # a transport failure, or an error frame in a 200
        return True
    return status in (408, 409, 425, 429) or status >= 500


def _describe(exc: BaseException, started: bool, stall_timeout: float) -> str:
    """What happened, in words safe for a client and a log: no provider body, no key."""
    if isinstance(exc, UpstreamFailed):
        what = f" ({exc.code})" if exc.code else ""
        return f"the model provider's stream failed{what}"
    if _is_timeout(exc):
        if started:
            return f"the model provider stalled (no data for {stall_timeout:g} s)"
        return f"the model provider did not answer within {stall_timeout:g} s"
    status = _status(exc)
    code = _error_code(exc)
    if status is None or status == 200:
        if code is not None:  # an error frame in the stream: its type is safe to name
            return f"the model provider's stream failed ({code})"
        if isinstance(exc, json.JSONDecodeError):
            return "the model provider sent a malformed stream"
        if status == 200:
            return "the model provider's stream failed"
        return "the connection to the model provider failed"
    meaning = {401: "refused the credentials", 403: "refused access", 404: "has no such model",
               429: "is rate limiting"}.get(status)  # fmt: skip
    if meaning is None:
        meaning = "failed" if status >= 500 else "refused the request"
    return f"the model provider {meaning} (HTTP {status})"


def _error_code(exc: BaseException) -> str | None:
    """The error type an SDK error carries in its body (``overloaded_error``), if it is one."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        body = body["error"]  # Anthropic's {"type": "error", "error": {...}}
    if not isinstance(body, Mapping):
        return None
    code = body.get("type") or body.get("code")
    return code if isinstance(code, str) and _SAFE_CODE.fullmatch(code) else None


def _retry_after(exc: BaseException) -> float:
    """A short ``Retry-After`` the provider asked for (at most 30 s), else 0."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    raw = headers.get("retry-after") if headers is not None else None
    try:
        asked = float(raw) if raw is not None else 0.0
    except ValueError:
        asked = 0.0
    return min(max(asked, 0.0), 30.0)
