"""The stream engine on its own (gevent greenlets, no HTTP): fan-out, resume, cut, life-cycle."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sse_blueprint import (
    ProducerContext,
    ProducerError,
    Stream,
    StreamClosed,
    StreamLimitReached,
    StreamState,
)
from sse_blueprint.engine import Event, StreamRegistry


def drain(sub: Any, timeout: float = 5) -> list[Event]:
    """Read a subscription until its terminal event (or a cut)."""
    got: list[Event] = []
    with gevent.Timeout(timeout):
        while True:
            got += sub.poll(1)
            if sub.done:
                return got


def counting(n: int, pause: float = 0) -> Any:
    def producer(ctx: ProducerContext) -> dict[str, Any]:
        for i in range(n):
            ctx.send("tick", {"n": i})
            ctx.sleep(pause)
        return {"sent": n}

    return producer


def test_events_have_strictly_increasing_ids_and_start_done() -> None:
    stream = Stream(counting(5), stream_id="s1")
    sub = stream.subscribe(0)
    stream.start()
    events = drain(sub)
    assert [e.event for e in events] == ["start"] + ["tick"] * 5 + ["done"]
    assert [e.id for e in events] == list(range(1, 8))
    assert events[0].data == {"stream_id": "s1", "producer": ""}
    assert events[-1].data == {"stream_id": "s1", "sent": 5}
    assert stream.state is StreamState.DONE


def test_new_stream_ids_are_random_128_bit() -> None:
    ids = {Stream(counting(0)).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 22 for i in ids)


def test_many_subscribers_all_get_everything() -> None:
    stream = Stream(counting(200))
    subs = [stream.subscribe(0) for _ in range(50)]
    stream.start()
    results = [gevent.spawn(drain, s) for s in subs]
    gevent.joinall(results, raise_error=True)
    expected = list(range(1, 203))
    assert all([e.id for e in g.value] == expected for g in results)
    assert stream.subscriber_count == 50  # they are still registered until closed
    for s in subs:
        s.close()
    assert stream.subscriber_count == 0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 120),
    joins=st.lists(st.tuples(st.integers(0, 130), st.integers(0, 130)), max_size=12),
    seed=st.integers(0, 2**32),
)
def test_subscribe_while_sending_is_gap_and_duplicate_free(
    n: int, joins: list[tuple[int, int]], seed: int
) -> None:
    """Readers join at random moments with random last ids while the producer sends."""
    rng = random.Random(seed)

    def producer(ctx: ProducerContext) -> None:
        for i in range(n):
            ctx.send("tick", {"n": i})
            if rng.random() < 0.3:
                gevent.sleep(0)

    stream = Stream(producer, client_queue=10_000)
    stream.start()
    readers = []
    for delay_steps, want in joins:
        for _ in range(delay_steps % 7):
            gevent.sleep(0)
        last = min(want, stream.last_event_id)  # an id the client could have seen
        readers.append((last, gevent.spawn(drain, stream.subscribe(last))))
    gevent.joinall([g for _, g in readers], raise_error=True)
    final = stream.last_event_id
    for last, greenlet in readers:
        assert [e.id for e in greenlet.value] == list(range(last + 1, final + 1))


def test_lagging_subscriber_is_cut_and_others_get_everything() -> None:
    stream = Stream(counting(100), client_queue=10)
    frozen = stream.subscribe(0)
    steady = stream.subscribe(0)
    cut_calls: list[int] = []
    frozen.on_cut = lambda: cut_calls.append(1)
    stream.start()
    events = drain(steady)
    assert [e.id for e in events] == list(range(1, 103))
    assert frozen.cut
    assert cut_calls == [1]  # it was not waiting in poll: the web layer must shut its socket
    assert frozen.poll(0) == []
    assert stream.subscriber_count == 1  # the cut one is gone and pins nothing


def test_waiting_subscriber_is_cut_without_closing_its_connection() -> None:
    def burst(ctx: ProducerContext) -> None:
        for i in range(50):  # never yields: the waiting reader cannot keep up
            ctx.send("tick", {"n": i})

    stream = Stream(burst, client_queue=5)
    calls: list[int] = []
    sub = stream.subscribe(0, on_cut=lambda: calls.append(1))

    reader = gevent.spawn(drain, sub)
    gevent.sleep(0)  # the reader is now waiting for news
    stream.start()
    reader.join()
    assert sub.cut
    assert calls == []


def test_slow_but_not_lagging_subscriber_is_not_cut() -> None:
    stream = Stream(counting(40, pause=0.001), client_queue=5)
    sub = stream.subscribe(0)
    stream.start()
    got: list[Event] = []
    with gevent.Timeout(5):
        while not (got and got[-1].terminal):
            got += sub.poll(1)
            gevent.sleep(0.0005)
    assert not sub.cut
    assert [e.id for e in got] == list(range(1, 43))


def test_cancel_stops_producer_and_ends_readers() -> None:
    finalized: list[str] = []

    def slow(ctx: ProducerContext) -> None:
        try:
            while True:
                ctx.send("tick", {})
                gevent.sleep(10)  # blocked in something that is not ctx.sleep
        finally:
            finalized.append("yes")

    stream = Stream(slow)
    subs = [stream.subscribe(0) for _ in range(3)]
    stream.start()
    gevent.sleep(0.01)
    assert stream.cancel("user") is True
    assert stream.cancel() is False
    for sub in subs:
        events = drain(sub)
        assert events[-1].event == "cancelled"
        assert events[-1].data == {"stream_id": stream.id, "reason": "user"}
    gevent.sleep(0.01)
    assert finalized == ["yes"]
    assert stream.state is StreamState.CANCELLED


def test_send_after_end_raises_stream_closed() -> None:
    caught: list[BaseException] = []

    def stubborn(ctx: ProducerContext) -> None:
        with contextlib.suppress(StreamClosed):
            ctx.sleep(10)
        try:
            ctx.send("late", {})
        except StreamClosed as exc:
            caught.append(exc)

    stream = Stream(stubborn)
    stream.start()
    gevent.sleep(0.01)
    stream.cancel()
    gevent.sleep(0.01)
    assert len(caught) == 1
    assert stream.terminal_event is not None
    assert stream.terminal_event.event == "cancelled"


def test_cancel_wakes_every_greenlet_asleep_in_ctx_sleep() -> None:
    """The producer and a helper greenlet of its own both in ctx.sleep(10): a cancel wakes
    both at once, each with StreamClosed (one sleeps plainly, the other on the closed event)."""
    woke: list[str] = []

    def sleeper(ctx: ProducerContext, name: str) -> None:
        try:
            ctx.sleep(10)
        except StreamClosed:
            woke.append(name)

    def producer(ctx: ProducerContext) -> None:
        helper = gevent.spawn(sleeper, ctx, "helper")
        sleeper(ctx, "producer")
        helper.join()

    stream = Stream(producer)
    stream.start()
    gevent.sleep(0.01)
    stream.cancel()
    assert stream.wait(2)
    gevent.sleep(0.01)
    assert sorted(woke) == ["helper", "producer"]  # (long before their 10 s were up)


def test_timeout_ends_with_error() -> None:
    stream = Stream(counting(1000, pause=0.01), timeout=0.05)
    sub = stream.subscribe(0)
    stream.start()
    events = drain(sub)
    assert events[-1].event == "error"
    assert events[-1].data["message"] == "stream timed out"
    assert stream.state is StreamState.ERROR


@pytest.mark.parametrize(
    ("exc", "message"),
    [(RuntimeError("db password is hunter2"), "producer failed"), (ProducerError("no"), "no")],
)
def test_producer_failure_ends_with_error(exc: Exception, message: str) -> None:
    def broken(ctx: ProducerContext) -> None:
        ctx.send("tick", {})
        raise exc

    stream = Stream(broken)
    sub = stream.subscribe(0)
    stream.start()
    events = drain(sub)
    assert [e.event for e in events] == ["start", "tick", "error"]
    assert events[-1].data["message"] == message


def test_killed_producer_never_leaves_stream_running() -> None:
    stream = Stream(counting(1000, pause=1))
    stream.start()
    gevent.sleep(0.01)
    greenlet = stream.producer.greenlet
    assert greenlet is not None
    greenlet.kill()  # e.g. a worker shutting down
    assert stream.state is StreamState.ERROR
    assert stream.terminal_event is not None
    assert stream.terminal_event.data["message"] == "producer stopped"


@pytest.mark.parametrize(
    ("event", "data"),
    [("done", {}), ("a\nb", {}), ("", {}), ("x", {"f": object()}), ("x", ["not", "a", "map"])],
)
def test_bad_sends_are_refused(event: str, data: Any) -> None:
    errors: list[Exception] = []

    def producer(ctx: ProducerContext) -> None:
        try:
            ctx.send(event, data)
        except ValueError as exc:
            errors.append(exc)

    stream = Stream(producer)
    stream.start()
    assert stream.wait(2)
    assert len(errors) == 1
    assert stream.state is StreamState.DONE


def test_subscribe_after_id_ahead_of_stream_gets_only_later_ids() -> None:
    stream = Stream(counting(20, pause=0.001))
    stream.start()
    sub = stream.subscribe(10)
    ahead = stream.subscribe(1_000)
    events = drain(sub)
    assert [e.id for e in events] == list(range(11, 23))
    with gevent.Timeout(2):
        while not stream.finished or ahead.lag:
            assert ahead.poll(0.1) == []


def test_on_complete_runs_once() -> None:
    seen: list[StreamState] = []
    stream = Stream(counting(3), on_complete=lambda s: seen.append(s.state))
    stream.start()
    stream.wait(2)
    stream.cancel()
    assert seen == [StreamState.DONE]


def test_registry_limits_running_streams_and_forgets_finished_ones() -> None:
    registry = StreamRegistry(max_streams=2, retention=0.05)
    a = registry.create(counting(1000, pause=0.01))
    b = registry.create(counting(0))
    b.wait(1)
    c = registry.create(counting(1000, pause=0.01))  # b finished, so there is room
    with pytest.raises(StreamLimitReached):
        registry.create(counting(1))
    assert registry.get(a.id) is a
    a.cancel()
    c.cancel()
    assert registry.running == 0
    gevent.sleep(0.1)
    assert registry.get(a.id) is None
    assert len(registry) == 0


def test_events_larger_than_the_limit_are_refused() -> None:
    errors: list[Exception] = []

    def producer(ctx: ProducerContext) -> None:
        ctx.text(0, "x" * 100)
        try:
            ctx.text(0, "y" * 1000)
        except ValueError as exc:
            errors.append(exc)

    stream = Stream(producer, max_event_bytes=300)
    sub = stream.subscribe(0)
    stream.start()
    events = drain(sub)
    assert len(errors) == 1
    assert "max_event_bytes" in str(errors[0])
    assert [e.event for e in events] == ["start", "text_delta", "done"]  # nothing half-sent


def _shutdown_case(handover: bool) -> tuple[Stream, list[Any], Any, StreamRegistry]:
    """A registry with a quick and a slow producer, a reader on each, shut down with 0.3 s."""
    registry = StreamRegistry()
    quick = registry.create(counting(3, 0.05))
    slow = registry.create(counting(1000, 0.05))
    subs = [quick.subscribe(0), slow.subscribe(0)]
    gevent.sleep(0.02)
    worker = gevent.spawn(registry.shutdown, 0.3, handover=handover)
    gevent.sleep(0)  # let it begin
    return slow, subs, worker, registry


def test_shutdown_without_handover_lets_readers_see_the_end() -> None:
    slow, subs, worker, registry = _shutdown_case(handover=False)
    with pytest.raises(StreamLimitReached, match="shutting down"):
        registry.create(counting(1))
    events = [drain(sub) for sub in subs]
    assert worker.get(timeout=5) == (1, 1)  # one finished within the grace, one was stopped
    assert events[0][-1].event == "done"
    assert events[1][-1].event == "error"
    assert events[1][-1].data["message"] == "server shutting down"
    assert slow.state is StreamState.ERROR
    assert [e.id for e in events[1]] == list(range(1, len(events[1]) + 1))


def test_shutdown_with_handover_releases_readers_at_once() -> None:
    slow, subs, worker, _ = _shutdown_case(handover=True)
    with gevent.Timeout(0.2):  # released long before the 0.3 s grace is over
        got = [drain(sub) for sub in subs]
    assert all(sub.done and sub.cut for sub in subs)
    assert not slow.finished  # the producer still runs: its stream is served elsewhere
    assert all(not events or not events[-1].terminal for events in got[1:])
    assert worker.get(timeout=5) == (1, 1)
    assert slow.terminal_event is not None
    assert slow.terminal_event.data["message"] == "server shutting down"


def test_shutdown_does_not_cut_a_reader_that_has_not_written_yet() -> None:
    """A reader that subscribed but has not polled yet (its request came in late) is not stuck
    in a write: the shutdown leaves it to take its events instead of ending its response."""
    registry = StreamRegistry()
    stream = registry.create(counting(3))
    gevent.sleep(0.05)
    late = stream.subscribe(0)
    assert registry.shutdown(0.1, handover=False) == (0, 0)  # it had already finished
    events = drain(late)
    assert [e.event for e in events] == ["start", "tick", "tick", "tick", "done"]
    stuck = Stream(counting(0), stream_id="s2")
    writer = stuck.subscribe(0)
    writer.writing_since = 1.0  # as the web layer marks a reader blocked in a write
    assert stuck.release_readers(only_writing=True) == 1
    assert writer.cut
