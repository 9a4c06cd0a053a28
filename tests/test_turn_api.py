"""The producer's API for typed turns: blocks, app events and their bounds (engine only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import pytest

from sse_blueprint import ProducerContext, Stream
from sse_blueprint.engine import Event
from sse_blueprint.storage.sql import SQLStore
from tests.helpers.sse_parser import Transcript


def run(producer: Callable[[ProducerContext], Any], **options: Any) -> tuple[Stream, list[Event]]:
    stream = Stream(producer, **options)
    sub = stream.subscribe(0)
    stream.start()
    events: list[Event] = []
    with gevent.Timeout(5):
        while not sub.done:
            events += sub.poll(1)
    sub.close()
    return stream, events


def test_blocks_are_numbered_in_order_and_end_with_their_meta() -> None:
    def agent(ctx: ProducerContext) -> None:
        with ctx.block("reasoning") as thinking:
            thinking.write("Hmm. ")
            thinking.write("Paris.")
        call = ctx.block("tool_call", {"name": "weather", "call_id": "c1"})
        call.write('{"city":')
        call.write(' "Paris"}')
        call.end({"input": {"city": "Paris"}})
        ctx.send("citation", {"url": "https://example.org"})
        ctx.send("progress", {"percent": 50}, replay="latest")
        ctx.send("typing", {}, replay="ephemeral")
        answer = ctx.block()
        answer.write("21 °C")
        assert (thinking.index, call.index, answer.index) == (0, 1, 2)

    stream, events = run(agent)
    names = [e.event for e in events]
    assert names[:4] == ["start", "block_start", "text_delta", "text_delta"]
    assert names.count("block_end") == 2  # the last block was never ended
    client = Transcript()
    for e in events:
        client.apply(e.id, e.event, e.data)
    assert client.turn == {
        0: {"kind": "reasoning", "meta": {}, "content": "Hmm. Paris.", "complete": True},
        1: {
            "kind": "tool_call",
            "meta": {"name": "weather", "call_id": "c1", "input": {"city": "Paris"}},
            "content": '{"city": "Paris"}',
            "complete": True,
        },
        2: {"kind": "text", "meta": {}, "content": "21 °C", "complete": False},
    }
    assert [e[1] for e in client.app_events] == ["citation", "progress", "typing"]
    assert stream.state == "done"


def test_plain_text_producers_work_as_before() -> None:
    def demo(ctx: ProducerContext) -> None:
        ctx.text(0, "a")
        ctx.text(0, "b")
        ctx.end_block(0)
        ctx.text(1, "c")

    _, events = run(demo)
    client = Transcript()
    for e in events:
        client.apply(e.id, e.event, e.data)
    assert client.text() == "abc"
    assert client.turn[0]["complete"] is True
    assert client.turn[1]["complete"] is False


@pytest.mark.parametrize(
    ("send", "message"),
    [
        (lambda ctx: ctx.block("Tool Call"), "must match"),
        (lambda ctx: ctx.block("x" * 65), "must match"),
        (lambda ctx: ctx.block("text", {"big": "x" * 300}), "SSE_MAX_META_BYTES"),
        (lambda ctx: ctx.block("text", {"f": object()}), "not JSON"),
        (lambda ctx: (ctx.end_block(0), ctx.text(0, "late")), "has ended"),
        (lambda ctx: (ctx.end_block(0), ctx.end_block(0)), "has ended"),
        (lambda ctx: (ctx.text(0, "x"), ctx.send("block_start", {"block": 0, "kind": "text"})),
         "already started"),
        (lambda ctx: ctx.end_block(0, {"big": "x" * 300}), "SSE_MAX_META_BYTES"),
        (lambda ctx: ctx.text(-1, "x"), "integer >= 0"),
        (lambda ctx: ctx.send("text_delta", {"block": 0, "text": 5}), "text_delta data"),
        (lambda ctx: ctx.send("note", {}, replay="sometimes"), "replay must be one of"),
        (lambda ctx: ctx.send("text_delta", {"block": 0, "text": "x"}, replay="latest"),
         "cannot be sent 'latest'"),
        (lambda ctx: ctx.send("turnblock_catchup", {}), "sent by the engine"),
        (lambda ctx: ctx.send("n" * 129, {}), "at most 128"),
        (lambda ctx: [ctx.send("note", {"i": i}) for i in range(4)], "SSE_MAX_DURABLE_EVENTS"),
        (lambda ctx: [ctx.send(f"p{i}", {}, replay="latest") for i in range(4)],
         "SSE_MAX_DURABLE_EVENTS"),
    ],
)  # fmt: skip
def test_a_producer_gets_a_clear_error(
    send: Callable[[ProducerContext], Any], message: str
) -> None:
    errors: list[str] = []

    def producer(ctx: ProducerContext) -> None:
        try:
            send(ctx)
        except ValueError as exc:
            errors.append(str(exc))
            ctx.text(9, "still usable")  # the stream is unharmed

    stream, events = run(producer, max_meta_bytes=256, max_replayed_events=3)
    assert len(errors) == 1
    assert message in errors[0]
    assert stream.state == "done"
    assert events[-2].data == {"block": 9, "text": "still usable"}


def test_bounds_leave_room_for_latest_updates_and_ephemeral_events() -> None:
    def producer(ctx: ProducerContext) -> None:
        ctx.send("note", {})
        for i in range(50):
            ctx.send("progress", {"i": i}, replay="latest")  # one name: one stored event
            ctx.send("typing", {}, replay="ephemeral")  # never stored

    stream, _ = run(producer, max_replayed_events=2)
    assert stream.state == "done"


def test_the_store_keeps_durable_events_and_the_newest_latest_one() -> None:
    store = SQLStore("sqlite://")

    def producer(ctx: ProducerContext) -> None:
        ctx.send("progress", {"i": 0}, replay="latest")
        ctx.send("citation", {"n": 1})
        ctx.send("typing", {}, replay="ephemeral")
        ctx.send("progress", {"i": 1}, replay="latest")
        ctx.send("citation", {"n": 2})

    stream, _ = run(producer, store=store)
    assert stream.saved.wait(5)
    stored = store.load_turn(stream.id, 0)
    assert [(e.event_id, e.event, e.data, e.replay) for e in stored.events] == [
        (3, "citation", {"n": 1}, "durable"),
        (5, "progress", {"i": 1}, "latest"),
        (6, "citation", {"n": 2}, "durable"),
    ]
    assert [(e.event_id, e.event) for e in store.load_turn(stream.id, 5).events] == [
        (6, "citation")
    ]
    store.close()
