"""Wire format: the only place that turns events into bytes.

Two encodings of the same event:

* **SSE** (``text/event-stream``), per the WHATWG HTML "Server-sent events" section. Data that
  spans several lines (split on CRLF, CR or LF, as the parser does) becomes several ``data:``
  lines, which a conforming parser joins back with LF. ``id`` and ``event`` values are single
  fields, so CR, LF (which would end the field) and NUL (which makes a parser ignore an ``id``)
  are refused with :class:`WireFormatError` instead of being silently mangled.
* **NDJSON** (``application/x-ndjson``): one JSON object per line,
  ``{"id": INT, "event": STR, "data": {...}}``.

Intentional choices, so nobody "fixes" them:

* Every field is written as ``name: value`` (one space). The parser strips exactly one leading
  space, so values that themselves start with a space survive.
* Data is always written, even when empty (``data: ``): a parser dispatches only events that
  had at least one ``data`` line, so an empty string still arrives as an (empty) event.
* NDJSON has no comments: a keep-alive is an empty line, which NDJSON readers skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "WireFormatError",
    "dumps",
    "encode_comment",
    "encode_event",
    "encode_ndjson",
    "encode_retry",
    "NDJSON_KEEPALIVE",
    "relay_message",
    "relay_message_head",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")
#: Event names already checked by :func:`check_event_name`.
_CHECKED_NAMES: set[str] = set()

#: An NDJSON keep-alive: an empty line.
NDJSON_KEEPALIVE = b"\n"


class WireFormatError(ValueError):
    """A value cannot be written as the SSE field it was meant for (CR, LF or NUL in it)."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: The C encoder behind :data:`_ENCODER`, made once: ``JSONEncoder.encode`` makes a new one
#: (and a dict for cycle detection) per call, which is 40 % of the cost of a token's event.
#: Without that dict a cycle ends in RecursionError, which :func:`dumps` turns into ValueError.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # (not in typeshed)
_C_ENCODER: Any = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
)


def dumps(data: Any) -> str:
    """Serialize event data as compact JSON (UTF-8 text, no ASCII escaping)."""
    if _C_ENCODER is None or type(data) is not dict:
        return _ENCODER.encode(data)
    try:
        return "".join(_C_ENCODER(data, 0))
    except RecursionError:
        raise ValueError("Circular reference detected") from None


def check_field(name: str, value: str) -> str:
    """Return ``value`` if it can be the value of SSE field ``name``; raise otherwise."""
    if not isinstance(value, str):
        raise WireFormatError(f"SSE {name} must be a string, not {type(value).__name__}")
    bad = _FORBIDDEN_IN_FIELD.search(value)
    if bad is not None:
        raise WireFormatError(
            f"SSE {name} {value!r} contains {bad.group()!r}; CR, LF and NUL are not allowed"
        )
    return value


def check_event_name(event: str) -> str:
    """:func:`check_field` for an ``event`` name, remembering the names that passed (a stream
    sends a few names many times, and every event is checked when it is made)."""
    if type(event) is not str or event not in _CHECKED_NAMES:
        check_field("event", event)
        if len(_CHECKED_NAMES) < 1024:
            _CHECKED_NAMES.add(event)
    return event


def encode_event(data: str, *, id: str | int | None = None, event: str | None = None) -> bytes:
    """Encode one SSE event.

    >>> encode_event('{"a":1}', id=3, event="text_delta")
    b'id: 3\\nevent: text_delta\\ndata: {"a":1}\\n\\n'
    """
    head = ""
    if id is not None:
        head = "id: " + (str(id) if type(id) is int else check_field("id", str(id))) + "\n"
    if event is not None:
        head += "event: " + check_event_name(event) + "\n"
    if "\n" not in data and "\r" not in data:  # one line (always so for JSON)
        return (head + "data: " + data + "\n\n").encode("utf-8")
    lines = "".join("data: " + line + "\n" for line in _LINE_BREAK.split(data))
    return (head + lines + "\n").encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment (ignored by parsers; used as a heartbeat). Each line gets its own ``:``."""
    lines = _LINE_BREAK.split(text)
    return ("".join(": " + line + "\n" if line else ":\n" for line in lines) + "\n").encode("utf-8")


#: The comment an idle SSE response sends every ``SSE_HEARTBEAT_INTERVAL`` seconds.
HEARTBEAT = encode_comment("heartbeat")


def encode_retry(milliseconds: int) -> bytes:
    """Encode the reconnection-time hint ``retry: N`` (a non-negative integer)."""
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int) or milliseconds < 0:
        raise WireFormatError(f"retry must be a non-negative integer, not {milliseconds!r}")
    return b"retry: %d\n\n" % milliseconds


def encode_ndjson(id: int, event: str, data: Mapping[str, Any] | str) -> bytes:
    """Encode one event as an NDJSON line. ``data`` may be pre-serialized JSON text."""
    body = data if isinstance(data, str) else dumps(data)
    return ('{"id":%d,"event":%s,"data":%s}\n' % (id, dumps(event), body)).encode("utf-8")


def relay_message(
    id: int, event: str, data_json: str, *, own: bool = False, replay: str = "durable"
) -> str:
    """One event as a message between workers (the Redis backend's Pub/Sub channel).

    ``{"id", "e", "d"}``, ``"o": 1`` for the owner's own appends and ``"r"`` for an app event
    that is not durable (``latest``, ``ephemeral``); ``data_json`` is the event's data already
    serialized. The event name is escaped like any JSON string.
    """
    extra = ('"o":1,' if own else "") + ("" if replay == "durable" else '"r":%s,' % dumps(replay))
    return '{"id":%d,%s"e":%s,"d":%s}' % (id, extra, dumps(event), data_json)


def relay_message_head(event: str, data_json: str) -> str:
    """:func:`relay_message` without its id, for a script that numbers the event itself: it
    appends the id and ``}`` (``head .. id .. '}'`` in Lua)."""
    return '{"e":%s,"d":%s,"id":' % (dumps(event), data_json)
