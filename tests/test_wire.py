"""The wire format against the WHATWG parsing rules (property tests) and NDJSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_blueprint._wire import (
    WireFormatError,
    dumps,
    encode_comment,
    encode_event,
    encode_ndjson,
    encode_retry,
)
from tests.helpers.sse_parser import ParsedEvent, SSEParser

FORBIDDEN = "\r\n\x00"
field_text = st.text(min_size=1).filter(lambda s: not any(c in s for c in FORBIDDEN))
bad_field = st.tuples(st.text(), st.sampled_from(FORBIDDEN), st.text()).map("".join)


def parse_all(data: bytes, cuts: list[int] | None = None) -> tuple[SSEParser, list[ParsedEvent]]:
    """Feed ``data`` to a fresh parser in pieces (split at ``cuts``); return it and its events."""
    parser = SSEParser()
    events: list[ParsedEvent] = []
    edges = sorted({c % (len(data) + 1) for c in (cuts or [])})
    start = 0
    for edge in [*edges, len(data)]:
        events += parser.feed(data[start:edge])
        start = edge
    events += parser.feed(b"", final=True)
    return parser, events


@given(data=st.text(), event_id=field_text, name=field_text, cuts=st.lists(st.integers(0, 10**6)))
def test_any_text_round_trips_through_whatwg_parser(
    data: str, event_id: str, name: str, cuts: list[int]
) -> None:
    encoded = encode_event(data, id=event_id, event=name)
    _, events = parse_all(encoded, cuts)
    assert len(events) == 1
    assert events[0].data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert events[0].type == name
    assert events[0].last_event_id == event_id


@given(data=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r")))
def test_data_without_cr_round_trips_exactly(data: str) -> None:
    _, events = parse_all(encode_event(data + "x", id=1, event="e"))
    assert events[0].data == data + "x"


@given(value=bad_field)
def test_cr_lf_nul_refused_in_id(value: str) -> None:
    with pytest.raises(WireFormatError, match="not allowed"):
        encode_event("x", id=value)


@given(value=bad_field)
def test_cr_lf_nul_refused_in_event_name(value: str) -> None:
    with pytest.raises(WireFormatError, match="not allowed"):
        encode_event("x", event=value)


@given(texts=st.lists(st.text(), max_size=5), cuts=st.lists(st.integers(0, 10**4)))
def test_comments_and_retry_dispatch_nothing(texts: list[str], cuts: list[int]) -> None:
    payload = encode_retry(1234) + b"".join(encode_comment(t) for t in texts)
    parser, events = parse_all(payload + encode_event("after", id=7, event="e"), cuts)
    assert parser.retry == 1234
    assert [(e.type, e.data, e.last_event_id) for e in events] == [("e", "after", "7")]


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, None])
def test_retry_must_be_a_non_negative_int(value: object) -> None:
    with pytest.raises(WireFormatError):
        encode_retry(value)  # type: ignore[arg-type]


def test_multiline_data_becomes_several_data_lines() -> None:
    assert encode_event("a\nb\r\nc\rd", id=5, event="x") == (
        b"id: 5\nevent: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )


@given(event=field_text, data=st.dictionaries(st.text(), st.text() | st.integers()))
def test_ndjson_is_one_json_line(event: str, data: dict[str, object]) -> None:
    line = encode_ndjson(42, event, data)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # no raw newline inside, whatever the text holds
    assert json.loads(line) == {"id": 42, "event": event, "data": data}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(data=st.dictionaries(st.text(), json_values, max_size=6))
def test_dumps_is_compact_json_of_the_same_value(data: dict[str, object]) -> None:
    """dumps (one C encoder made once) writes what json.dumps with the same options writes."""
    text = dumps(data)
    assert text == json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert json.loads(text) == data


def test_dumps_refuses_what_is_not_json() -> None:
    circular: dict[str, object] = {}
    circular["self"] = {"again": [circular]}
    with pytest.raises(ValueError, match="Circular"):
        dumps(circular)
    with pytest.raises(ValueError, match="Out of range float"):
        dumps({"x": float("nan")})
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        dumps({"x": {1, 2}})
    with pytest.raises(TypeError):
        dumps({("a", "b"): 1})  # keys are strings, numbers, booleans or null


redis_part = st.one_of(
    st.text(), st.binary(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)


@given(st.lists(redis_part, min_size=1, max_size=20))
def test_script_calls_are_packed_as_redis_py_packs_them(parts: list[object]) -> None:
    """The Redis owner packs its appends itself (redis-py's encoder was most of an append's
    cost): the bytes must be exactly redis-py's for the same command."""
    import redis

    from sse_blueprint.backends.redis.connection import _resp

    connection: Any = redis.Connection  # (untyped in redis-py)
    theirs = b"".join(connection().pack_command("EVALSHA", *parts))
    assert _resp(("EVALSHA", *parts)) == theirs


@given(st.lists(redis_part, max_size=6), st.lists(redis_part, max_size=12))
def test_a_bound_script_packs_the_same_call(fixed: list[object], rest: list[object]) -> None:
    """A stream's append script with its keys and first arguments encoded once packs every
    call exactly as the whole call is packed."""
    from sse_blueprint.backends.redis.connection import LuaScript, _resp

    script = LuaScript.__new__(LuaScript)  # (no connection needed to pack)
    script.sha = "0" * 40
    keys = ["sse:{s}:meta", "sse:{s}:events", "sse:{s}:lease"]
    whole = _resp(("EVALSHA", script.sha, 3, *keys, *fixed, *rest))
    assert script.bind(keys, fixed).pack((), rest) == whole
