"""The outbox (fast tier): with a shared backend, the events a producer writes before it pauses
go out in one call, and go into the log only once acknowledged; refused or failed calls never
happen (not in the buffer, the turn or the store). A fake backend answers each call after a
delay, or refuses it, or fails it, as the test says."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gevent
import pytest

from sse_blueprint import ProducerContext, SQLStore, Stream, StreamState
from sse_blueprint.engine import Event, StreamClosed
from tests.helpers.sse_parser import Transcript

Done = Callable[[BaseException | None], None]


class FakeBackend:
    """A shared backend that takes each call after ``delay`` seconds (0: on the loop's next
    turn). ``refuse_call`` (1-based) is refused as Redis refuses a stream cancelled elsewhere:
    the backend writes ``cancelled`` after what it has and the owner adopts it.
    ``fail_call`` fails with a connection error (Redis away for longer than its patience)."""

    def __init__(
        self, delay: float = 0, refuse_call: int = 0, fail_call: int = 0, ran: bool = False
    ) -> None:
        self.delay = delay
        self.refuse_call = refuse_call
        self.fail_call = fail_call
        self.ran = ran  # the failed call was written all the same (its answer was lost)
        self.cancel_after_fail = False  # and then the stream is cancelled elsewhere
        self.calls: list[list[Event]] = []
        self.taken: list[Event] = []

    def claim(self, stream: Stream) -> None:
        pass

    def append(self, stream: Stream, events: Sequence[Event], done: Done) -> None:
        self.calls.append(list(events))
        gevent.spawn_later(self.delay, self._answer, stream, list(events), done)

    def _answer(self, stream: Stream, events: list[Event], done: Done) -> None:
        n = len(self.calls)
        if n == self.refuse_call or (self.taken and self.taken[-1].terminal):
            if not self.taken[-1].terminal:
                end = Event(self.taken[-1].id + 1, "cancelled", {"stream_id": stream.id})
                self.taken.append(end)
                stream.adopt_end(end)
            done(StreamClosed(stream.id))
        elif n == self.fail_call:
            if self.ran:
                self.taken += events
            if self.cancel_after_fail:
                end = Event(self.taken[-1].id + 1, "cancelled", {"stream_id": stream.id})
                self.taken.append(end)
                stream.adopt_end(end)  # (it follows events the owner has not taken yet)
            done(ConnectionError("Redis is away"))
        else:
            # As the append script: what it has already is skipped; no gap.
            after = self.taken[-1].id if self.taken else 0
            new = [ev for ev in events if ev.id > after]
            assert not new or new[0].id == after + 1
            self.taken += new
            done(None)

    def persisted(self, stream: Stream, up_to_id: int) -> None:
        pass

    def set_metadata(self, stream: Stream, metadata: Mapping[str, Any]) -> None:
        pass


def paced(pauses: int, per_pause: Callable[[ProducerContext, int], None]) -> Any:
    def producer(ctx: ProducerContext) -> dict[str, Any]:
        for p in range(pauses):
            per_pause(ctx, p)
            ctx.sleep(0.002)
        return {}

    return producer


def burst(ctx: ProducerContext, p: int) -> None:
    """1 to 5 events in one pause, each tagged with its pause: a block, text, its end, usage."""
    block = ctx.block("text", {"p": p})
    for k in range(p % 3):
        ctx.send("note", {"p": p, "k": k})
    block.write(f"[{p}]")
    block.end({"p": p})
    if p % 4 == 0:
        ctx.send("usage", {"p": p}, replay="latest")


def pause_of(ev: Event) -> int | None:
    data = ev.data
    if "p" in data:
        return int(data["p"])
    meta = data.get("meta") or {}
    return int(meta["p"]) if "p" in meta else None


def rebuilt(events: Sequence[Event]) -> dict[int, str]:
    transcript = Transcript()
    for ev in events:
        transcript.apply(ev.id, ev.event, dict(ev.data))
    return transcript.blocks


def ended(
    backend: FakeBackend, state: StreamState, producer: Any = None, **options: Any
) -> tuple[Stream, list[Event]]:
    """Run ``producer`` (30 pauses of :func:`burst`) on ``backend`` to its end, which must be
    ``state``: the stream, and what a reader subscribed from the start got."""
    stream = Stream(producer or paced(30, burst), backend=backend, **options)
    sub = stream.subscribe(0)
    stream.start()
    assert stream.wait(10)
    assert stream.state is state, stream.terminal_event
    return stream, sub.poll(5000)


@pytest.mark.parametrize("delay", [0, 0.01])
def test_the_events_of_one_pause_go_in_one_call_and_arrive_whole(delay: float) -> None:
    backend = FakeBackend(delay)
    stream, got = ended(backend, StreamState.DONE)
    calls_of: dict[int, set[int]] = {}
    for n, call in enumerate(backend.calls):
        for ev in call:
            p = pause_of(ev)
            if p is not None:
                calls_of.setdefault(p, set()).add(n)
    assert sorted(calls_of) == list(range(30))
    assert all(len(calls) == 1 for calls in calls_of.values())  # no pause split across calls
    assert len(backend.calls) <= 30 + 2  # at most one per pause, the start's and the end's
    # Every event once, in order, as the backend has them; the readers and the turn agree.
    assert [e.id for e in got] == [e.id for e in backend.taken] == list(range(1, len(got) + 1))
    assert rebuilt(got) == {p: f"[{p}]" for p in range(30)}
    assert [b.content() for b in stream.turn.blocks.values()] == [f"[{p}]" for p in range(30)]


def test_checks_count_the_events_still_on_their_way() -> None:
    outcomes: list[str] = []

    def producer(ctx: ProducerContext) -> None:
        first = ctx.block()
        first.write("a")
        first.end()
        second = ctx.block()  # numbered after the first, which is not in the log yet
        outcomes.append(f"second={second.index}")
        for attempt in (lambda: first.write("late"), lambda: ctx.send("x", {}), lambda: None):
            try:
                attempt()
            except ValueError as exc:
                outcomes.append(str(exc).split(";")[0])
        second.end()
        ctx.sleep(0.05)

    backend = FakeBackend(0.02)
    stream = Stream(producer, backend=backend, max_replayed_events=0)
    stream.start()
    assert stream.wait(5)
    assert stream.state is StreamState.DONE, stream.terminal_event
    assert outcomes == [
        "second=1",
        "block 0 has ended",
        "this stream already has 0 replayable events (SSE_MAX_DURABLE_EVENTS = 0)",
    ]
    assert [b.content() for b in stream.turn.blocks.values()] == ["a", ""]


def test_a_refused_call_never_happened_anywhere(tmp_path: Any) -> None:
    store = SQLStore(f"sqlite:///{tmp_path}/turns.sqlite3")
    backend = FakeBackend(0.005, refuse_call=6)
    stream, got = ended(backend, StreamState.CANCELLED, store=store)
    assert stream.saved.wait(10)
    # The reader, the buffer and the store have exactly what the backend took, and its end.
    assert [e.id for e in got] == [e.id for e in backend.taken] == list(range(1, len(got) + 1))
    assert got[-1].event == "cancelled"
    refused = {ev.id for ev in backend.calls[5]}
    assert refused
    assert not refused & {e.id for e in got if e.event != "cancelled"}
    text = rebuilt(got)
    turn = store.load_turn(stream.id, 0)
    assert {b.block: b.content for b in turn.blocks} == text
    assert text
    assert all(content.startswith("[") for content in text.values())
    assert stream.turn.blocks.keys() == text.keys()


@pytest.mark.parametrize("ran", [False, True])
def test_a_call_with_no_answer_goes_again_with_the_end_and_the_producer_fails(ran: bool) -> None:
    backend = FakeBackend(0.005, fail_call=4, ran=ran)
    _, got = ended(backend, StreamState.ERROR)
    # Every event once, in order, as the backend has them: the unanswered call's too.
    assert [e.id for e in got] == [e.id for e in backend.taken] == list(range(1, len(got) + 1))
    assert got[-1].data["message"] == "producer failed"
    unanswered = backend.calls[3]
    assert backend.calls[4][: len(unanswered)] == unanswered  # sent again, first
    assert {ev.id for ev in unanswered} < {e.id for e in got}
    assert max(p for e in got if (p := pause_of(e)) is not None) < 29  # the producer stopped


def test_a_producer_that_never_pauses_waits_for_room() -> None:
    def flood(ctx: ProducerContext) -> None:
        with ctx.block() as block:
            for n in range(2000):
                block.write(f"{n} ")

    backend = FakeBackend(0.001)
    _, got = ended(backend, StreamState.DONE, flood)
    assert max(len(call) for call in backend.calls) <= 256
    assert len(backend.calls) >= 2000 // 256
    assert rebuilt(got) == {0: "".join(f"{n} " for n in range(2000))}


def test_a_cancel_while_events_are_on_their_way_comes_after_them() -> None:
    backend = FakeBackend(0.01)
    stream = Stream(paced(1000, burst), backend=backend)
    sub = stream.subscribe(0)
    stream.start()
    gevent.sleep(0.05)
    assert stream.cancel("enough")
    assert stream.state is StreamState.CANCELLED
    got = sub.poll(5000)
    assert got[-1].event == "cancelled"
    assert got[-1].data["reason"] == "enough"
    assert [e.id for e in got] == [e.id for e in backend.taken] == list(range(1, len(got) + 1))
    with pytest.raises(StreamClosed):
        stream.append("late", {})


def test_an_end_written_after_an_unanswered_call_is_taken_with_what_the_backend_has(
    tmp_path: Any,
) -> None:
    """The backend ran a call whose answer was lost, then the stream was cancelled elsewhere:
    the call's events go again and are refused. The owner takes them all the same, as the
    backend has them (every other worker's readers got them), then the end (it used to wait
    for those events for ever, then to take the end after a gap): its readers, its buffer and
    its store hold what the backend holds."""
    backend = FakeBackend(0.005, fail_call=4, ran=True)
    backend.cancel_after_fail = True
    store = SQLStore(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    stream, got = ended(backend, StreamState.CANCELLED, store=store)
    assert got[-1].id == backend.taken[-1].id  # the backend's end, under its id
    assert {ev.id for ev in backend.calls[3]} <= {e.id for e in got}  # the call that ran
    assert [(e.id, e.event, e.data) for e in got] == [
        (e.id, e.event, e.data) for e in backend.taken
    ]
    assert stream.saved.wait(10)
    turn = store.load_turn(stream.id, 0)
    assert {b.block: b.content for b in turn.blocks} == rebuilt(backend.taken)
