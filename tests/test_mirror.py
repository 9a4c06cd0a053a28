"""A mirror on its own (no Redis): fed another worker's events, it gives its readers each event
once and in order, writes nothing, and catches readers up from the owner's store when it started
after events were trimmed."""

from __future__ import annotations

import random

import gevent
import pytest

from sse_blueprint.engine import Event, Mirror, ProducerContext, Stream
from sse_blueprint.storage.sql import SQLStore
from tests.helpers.sse_parser import Transcript

WORDS = [f"w{i} " for i in range(30)]


def owner(store: SQLStore | None = None, pause: float = 0) -> tuple[Stream, list[Event]]:
    """A stream of three text blocks (a pause after the second), started, and the list that
    fills with every event it sends, in order."""

    def producer(ctx: ProducerContext) -> None:
        for n, word in enumerate(WORDS):
            ctx.text(n // 10, word)
            ctx.sleep(0.002)  # (its reader keeps up, so it never holds the trim back)
            if n % 10 == 9:
                ctx.end_block(n // 10)
                if n == 19:
                    ctx.sleep(pause)

    stream = Stream(producer, store=store, buffer_size=1000)
    sub = stream.subscribe(0)
    events: list[Event] = []

    def follow() -> None:
        try:
            while not sub.done:
                events.extend(sub.poll(1))
        finally:
            sub.close()

    gevent.spawn(follow)
    stream.start()
    return stream, events


def read(mirror: Mirror, seen: list[Event] | None = None) -> Transcript:
    """A client that had ``seen`` (the owner's first events) resumes on ``mirror``."""
    transcript = Transcript()
    for e in seen or []:
        transcript.apply(e.id, e.event, e.data)
    sub = mirror.subscribe(transcript.last_id)
    with gevent.Timeout(5):
        while not sub.done:
            for e in sub.poll(1):
                transcript.apply(e.id, e.event, e.data)
    sub.close()
    return transcript


def test_a_mirror_gives_each_event_once_in_order_and_writes_nothing() -> None:
    stream, events = owner()
    assert stream.wait(5)
    gevent.sleep(0.05)
    store = SQLStore("sqlite://")
    mirror = Mirror(stream.id, store=store)
    reader = mirror.subscribe(0)
    got: list[Event] = []
    rng = random.Random(7)
    for n, event in enumerate(events):
        mirror.ingest(event)
        for again in rng.sample(events[: n + 1], k=min(3, n + 1)):
            mirror.ingest(again)  # a refill after a gap sends some again
        gevent.sleep(0)
        got += reader.poll(0)
    got += reader.poll(1)
    assert [(e.id, e.event) for e in got] == [(e.id, e.event) for e in events]
    assert mirror.finished
    assert mirror.terminal_event == events[-1]
    mirror.ingest(Event(events[-1].id + 1, "tick", {}))  # nothing after the end
    assert mirror.last_event_id == events[-1].id
    assert store.load_stream(stream.id) is None  # the owner writes, not a mirror


def test_a_mirror_that_starts_after_a_trim_catches_readers_up_from_the_store() -> None:
    store = SQLStore("sqlite://")
    stream, events = owner(store, pause=0.5)
    gevent.sleep(0.3)  # in the pause: blocks 0 and 1 are persisted and trimmed
    held = stream.buffered_after(0)
    assert stream.trimmed_id > 1
    assert held
    mirror = Mirror(stream.id, store=store)
    mirror.follow_from(held[0].id)  # what the backend still holds starts here
    for event in held:
        mirror.ingest(event)
    assert stream.wait(5)
    gevent.sleep(0.05)
    for event in events:
        mirror.ingest(event)  # the rest (and what it has: ignored)
    for k in (0, 1, 5, len(events) - len(held), len(events) - 2):
        transcript = read(mirror, events[:k])  # resumed before, at and after the trim
        assert transcript.text() == "".join(WORDS)
        assert transcript.terminal == "done"
    mirror.trim_persisted(events[-1].id)  # the owner says: all of it is stored
    assert mirror.trimmed_id > held[0].id
    assert read(mirror).text() == "".join(WORDS)


def test_a_mirror_has_no_producer_to_start() -> None:
    with pytest.raises(RuntimeError, match="mirror"):
        Mirror("x").start()


def test_a_reader_caught_up_on_a_mirror_behind_the_store_gets_no_event_twice() -> None:
    """The owner has persisted more than this worker's mirror has ingested yet (its Pub/Sub
    lags): a reader's catch-up covers events the mirror gets only later. Those must not reach
    the reader again as live events (the client would apply them twice)."""
    store = SQLStore("sqlite://")
    stream, events = owner(store)
    assert stream.wait(5)
    gevent.sleep(0.05)
    mirror = Mirror(stream.id, store=store)
    mirror.follow_from(events[4].id)  # Redis trimmed what came before (it was persisted)
    behind = 15
    for event in events[4:behind]:
        mirror.ingest(event)
    sub = mirror.subscribe(events[1].id)  # older than the mirror's buffer: the store first
    assert sub.from_store
    caught_up = sub.poll(1)
    assert max(e.id for e in caught_up) > events[behind].id  # the store is ahead of the mirror
    for event in events[behind:]:
        mirror.ingest(event)
    transcript = Transcript()
    for e in events[:2]:
        transcript.apply(e.id, e.event, e.data)
    delivered = list(caught_up)
    with gevent.Timeout(5):
        while not sub.done:
            delivered += sub.poll(1)
    sub.close()
    ids = [e.id for e in delivered]
    assert ids == sorted(set(ids)), "an event reached the reader twice"
    for e in delivered:
        transcript.apply(e.id, e.event, e.data)
    assert transcript.text() == "".join(WORDS)
    assert transcript.terminal == "done"


def test_a_reader_that_subscribes_to_a_retired_mirror_resumes_elsewhere() -> None:
    """A reader found a mirror and waited (a call to Redis) while the backend dropped it: its
    subscription, made after, ends at once, so that it resumes from its last id on the mirror
    that replaces it, instead of following one that nothing feeds any more (for ever, kept
    alive by heartbeats)."""
    mirror = Mirror("s")
    for n in range(1, 4):
        mirror.ingest(Event(n, "start" if n == 1 else "text_delta", {"block": 0, "text": "x"}))
    early = mirror.subscribe(1)
    mirror.retire()
    assert early.done
    late = mirror.subscribe(2)
    assert late.cut
    assert late.done
    assert late.poll(0) == []
    assert mirror.subscriber_count == 0
