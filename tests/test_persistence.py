"""Persist-and-trim and two-tier catch-up in the engine, on a real SQLStore (SQLite in memory).

The store is wrapped to fail or to be slow on demand; everything else is the real thing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_blueprint.engine import (
    LOST_ID_GAP,
    Event,
    ProducerContext,
    Stream,
    StreamRegistry,
    lost,
    replay,
)
from sse_blueprint.engine import persister as persister_module
from sse_blueprint.storage.records import StoredTurn, StreamRecord, TurnBlock, TurnEvent
from sse_blueprint.storage.sql import SQLStore
from tests.helpers.sse_parser import Transcript


class FlakyStore:
    """A real store whose writes can fail or take time, on demand."""

    def __init__(self, rng: random.Random | None = None, failure_rate: float = 0.0) -> None:
        self.inner = SQLStore("sqlite://")
        self.rng = rng or random.Random(0)
        self.failure_rate = failure_rate
        self.fail_next = 0
        self.write_delay = 0.0
        self.ack_delay = 0.0  # after the write: committed, but the writer does not know yet
        self.saves = 0
        self.failures = 0
        self.writing = gevent.event.Event()  # set when a delayed write begins

    def save(
        self,
        record: StreamRecord,
        blocks: Sequence[TurnBlock],
        events: Sequence[TurnEvent] = (),
    ) -> None:
        if self.write_delay and (blocks or events):
            self.writing.set()
            gevent.sleep(self.write_delay)  # the producer keeps sending meanwhile
        if self.fail_next > 0 or self.rng.random() < self.failure_rate:
            self.fail_next = max(0, self.fail_next - 1)
            self.failures += 1
            raise OSError("injected database failure")
        self.saves += 1
        self.inner.save(record, blocks, events)
        if self.ack_delay and (blocks or events):
            gevent.sleep(self.ack_delay)  # readers that load the turn now see more than is out

    def load_stream(self, stream_id: str) -> StreamRecord | None:
        return self.inner.load_stream(stream_id)

    def load_turn(self, stream_id: str, after_id: int) -> StoredTurn:
        return self.inner.load_turn(stream_id, after_id)

    def load_blocks(self, stream_id: str, after_id: int) -> list[TurnBlock]:
        return self.inner.load_blocks(stream_id, after_id)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persister_module, "PERSIST_RETRY_MIN", 0.001)
    monkeypatch.setattr(persister_module, "PERSIST_RETRY_MAX", 0.005)


def apply_all(client: Transcript, events: list[Event]) -> None:
    for e in events:
        client.apply(e.id, e.event, e.data)


def read_session(
    stream: Stream, client: Transcript, budget: int, store: FlakyStore | None = None
) -> None:
    """One connection: subscribe at the client's last id, take up to ``budget`` events. With
    ``store`` (durable delivery), every event taken must already be in it."""
    sub = stream.subscribe(client.last_id)
    try:
        with gevent.Timeout(10):
            taken = 0
            while not sub.done and taken < budget:
                events = sub.poll(0.5)
                ids = [e.id for e in events]
                assert ids == sorted(set(ids)), "ids must strictly increase within a response"
                assert all(i > client.last_id for i in ids), "nothing at or before the position"
                if store is not None and ids:
                    record = store.inner.load_stream(stream.id)
                    assert record is not None
                    assert record.last_event_id >= ids[-1], "delivered before it was durable"
                apply_all(client, events)
                taken += len(events)
    finally:
        sub.close()


KINDS = ["text", "reasoning", "tool_call", "tool_result", "app.note"]
APP_EVENTS = {
    "citation": "durable",
    "usage": "durable",
    "progress": "latest",
    "typing": "ephemeral",
}

NO_META: st.SearchStrategy[dict[str, Any]] = st.just({})
START_META = st.dictionaries(st.sampled_from(["name", "call_id", "x"]), st.text(max_size=3))
END_META = st.dictionaries(st.sampled_from(["x", "stop"]), st.integers(0, 9), max_size=2)
BLOCK = st.integers(0, 3)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), BLOCK, st.sampled_from(KINDS), START_META),
        st.tuples(st.just("delta"), BLOCK, st.text(min_size=1, max_size=4), NO_META),
        st.tuples(st.just("end"), BLOCK, st.just(""), END_META),
        st.tuples(
            st.just("event"), st.integers(0, 9), st.sampled_from(sorted(APP_EVENTS)), NO_META
        ),
        st.tuples(st.just("yield"), st.just(0), st.just(""), NO_META),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=ops,
    buffer_size=st.sampled_from([1, 2, 5, 12, 1000]),
    failure_rate=st.sampled_from([0.0, 0.3]),
    write_delay=st.sampled_from([0.0, 0.003, 0.01]),
    ack_delay=st.sampled_from([0.0, 0.0, 0.004]),
    clients=st.lists(st.lists(st.integers(1, 15), min_size=1, max_size=8), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    durable=st.booleans(),
)
def test_resume_invariant_under_random_persist_trim_and_reconnects(
    script: list[tuple[str, int, str, dict[str, Any]]],
    buffer_size: int,
    failure_rate: float,
    write_delay: float,
    ack_delay: float,
    clients: list[list[int]],
    seed: int,
    durable: bool,
) -> None:
    """Random turns (blocks of every kind with meta, durable, latest and ephemeral events) and
    random resume points, whatever the persist/trim schedule and store failures: after every
    session a client holds exactly the producer's blocks as of its last id, every durable event
    once and in order, and the newest latest event of each name; in durable delivery, no event
    reaches a reader before the store has it."""
    rng = random.Random(seed)
    store = FlakyStore(rng, failure_rate)
    store.write_delay = write_delay
    store.ack_delay = ack_delay
    sent: list[tuple[int, str, dict[str, Any]]] = []  # every event the producer sent, as sent

    def producer(ctx: ProducerContext) -> None:
        state: dict[int, str] = {}  # block -> "open" | "ended"
        for op, n, arg, meta in script:
            if op == "start" and n not in state:
                index = ctx.block(arg, meta).index
                state[index] = "open"
                sent.append(
                    (ctx_last(ctx), "block_start", {"block": index, "kind": arg, "meta": meta})
                )
            elif op == "delta" and state.get(n) != "ended":
                sent.append((ctx.text(n, arg), "text_delta", {"block": n, "text": arg}))
                state.setdefault(n, "open")
            elif op == "end" and state.get(n) == "open":
                sent.append((ctx.end_block(n, meta), "block_end", {"block": n, "meta": meta}))
                state[n] = "ended"
            elif op == "event":
                data = {"n": n}
                sent.append((ctx.send(arg, data, replay=APP_EVENTS[arg]), arg, data))
            elif op == "yield":
                gevent.sleep(rng.choice([0, 0.001, 0.004]))

    def ctx_last(ctx: ProducerContext) -> int:
        return stream.last_event_id

    stream = Stream(
        producer, buffer_size=buffer_size, store=store, client_queue=10_000, durable=durable
    )

    def expected_at(position: int) -> Transcript:
        want = Transcript()
        for event_id, name, data in sent:
            if event_id <= position:
                want.apply(event_id, name, data)
        return want

    def check(client: Transcript) -> None:
        want = expected_at(client.last_id)
        assert client.turn == want.turn, "blocks inexact after a session"
        got = [(i, e, d) for i, e, d in client.app_events if APP_EVENTS[e] == "durable"]
        assert got == [(i, e, d) for i, e, d in want.app_events if APP_EVENTS[e] == "durable"]
        for name, mode in APP_EVENTS.items():
            if mode == "latest":
                assert client.latest.get(name) == want.latest.get(name), f"newest {name}"

    def client_run(budgets: list[int]) -> Transcript:
        client = Transcript()
        for budget in budgets:
            read_session(stream, client, budget, store if durable else None)
            check(client)
            gevent.sleep(rng.choice([0, 0.001, 0.003, 0.02]))  # writes and trims happen meanwhile
            if client.terminal:
                return client
        while client.terminal is None:
            read_session(stream, client, 10**6, store if durable else None)
        return client

    def coverage_monitor() -> int:
        """The invariant catch-up stands on: store row + buffered events after it = the block."""
        checks = 0
        while not (stream.finished and stream.saved.is_set()):
            rows = {r.block: r for r in store.inner.load_blocks(stream.id, 0)}
            buffered = stream.buffered_after(0)  # no blocking call between this and the rows' use
            for index, block in stream.turn.blocks.items():
                row = rows.get(index)
                rebuilt = row.content if row else ""
                after = row.last_event_id if row else 0
                for e in buffered:
                    if e.event == "text_delta" and e.data["block"] == index and e.id > after:
                        rebuilt += e.data["text"]
                assert rebuilt == block.content(), f"block {index} not covered"
            checks += 1
            gevent.sleep(0.0005)
        return checks

    stream.start()
    monitor = gevent.spawn(coverage_monitor)
    readers = [gevent.spawn(client_run, budgets) for budgets in clients]
    gevent.joinall([*readers, monitor], raise_error=True, timeout=30)
    assert monitor.value > 0
    final = expected_at(stream.last_event_id)
    for reader in readers:
        client = reader.value
        check(client)
        assert client.turn == final.turn
        assert client.ids == sorted(set(client.ids)), "an id arrived twice"
        assert client.terminal == "done"
    # Everything reaches the store in the end, despite failures: a restart would serve it.
    assert stream.saved.wait(10)
    record = store.load_stream(stream.id)
    assert record is not None
    assert record.state == "done"
    assert record.terminal_id == stream.last_event_id
    for after in sorted({0, *(rng.randrange(0, stream.last_event_id) for _ in range(3))}):
        from_store = expected_at(after)
        apply_all(from_store, replay(record, store.load_turn(stream.id, after), after))
        assert from_store.turn == final.turn, f"store-only replay from {after}"
        want = [(i, e, d) for i, e, d in final.app_events if APP_EVENTS[e] == "durable"]
        got = [(i, e, d) for i, e, d in from_store.app_events if APP_EVENTS[e] == "durable"]
        assert got == want
        assert from_store.latest.get("progress") == final.latest.get("progress")
        assert from_store.terminal == "done"


def test_resume_after_trim_when_persist_races_send() -> None:
    """A slow write must not trim events sent while it was in flight (the peers' bug)."""
    store = FlakyStore()
    store.write_delay = 0.05
    release = gevent.event.Event()

    def producer(ctx: ProducerContext) -> None:
        for i in range(5):
            ctx.text(0, f"a{i} ")
        ctx.end_block(0)
        store.writing.wait()  # the persister took its snapshot (id 7); the write takes 50 ms...
        for i in range(5):
            ctx.text(1, f"b{i} ")  # ...while these are sent
            gevent.sleep(0.001)
        release.wait()

    stream = Stream(producer, store=store, buffer_size=1000)
    stream.start()
    gevent.sleep(0.2)  # the write of block 0 is done and the buffer trimmed up to it
    assert stream.trimmed_id == 7  # start (1), block 0 (2..6, its end 7); nothing of block 1
    assert [e.id for e in stream.buffered_after(0)] == [8, 9, 10, 11, 12]  # sent meanwhile: kept
    late = Transcript()
    sub = stream.subscribe(3)  # had seen "a0 a1" only: older than the buffer
    apply_all(late, sub.poll(1))
    assert late.events[0][1] == "turnblock_catchup"
    assert late.events[0][2]["content"] == "a0 a1 a2 a3 a4 "
    assert [e[2]["text"] for e in late.events[1:]] == [f"b{i} " for i in range(5)]
    release.set()
    stream.wait(2)


def test_failed_persist_keeps_everything_then_persists() -> None:
    store = FlakyStore()
    store.fail_next = 5

    def producer(ctx: ProducerContext) -> None:
        for block in range(3):
            for i in range(4):
                ctx.text(block, f"{block}.{i} ")
            ctx.end_block(block)
            gevent.sleep(0)

    stream = Stream(producer, store=store)
    stream.start()
    stream.wait(2)
    # Whatever failed so far, a late reader from the start still gets the whole text.
    reader = Transcript()
    read_session(stream, reader, 10**6)
    want = "".join(f"{b}.{i} " for b in range(3) for i in range(4))
    assert reader.text() == want
    assert stream.saved.wait(5)
    assert store.failures == 5
    assert stream.persister is not None
    assert stream.persister.failures == 5
    record = store.load_stream(stream.id)
    assert record is not None
    blocks = store.load_blocks(stream.id, 0)
    assert "".join(b.content for b in blocks) == want
    assert stream.buffered == 1  # trimmed up to the terminal event, which always stays


def test_buffer_overflow_persists_a_partial_block() -> None:
    store = FlakyStore()
    pause = gevent.event.Event()

    def producer(ctx: ProducerContext) -> None:
        for i in range(50):  # one long block, never ended
            ctx.text(0, f"{i},")
        pause.wait()

    stream = Stream(producer, store=store, buffer_size=10)
    stream.start()
    gevent.sleep(0.05)
    rows = store.load_blocks(stream.id, 0)
    assert len(rows) == 1
    assert rows[0].content == "".join(f"{i}," for i in range(50))[: len(rows[0].content)]
    assert stream.buffered <= 11
    late = Transcript()
    sub = stream.subscribe(2)
    apply_all(late, sub.poll(1))
    assert late.text() == "".join(f"{i}," for i in range(50))
    pause.set()
    stream.wait(1)


def test_reader_pins_the_buffer_until_it_has_read() -> None:
    store = FlakyStore()
    go = gevent.event.Event()

    def producer(ctx: ProducerContext) -> None:
        for i in range(10):
            ctx.text(0, str(i))
        go.wait()
        ctx.end_block(0)
        go.clear()
        go.wait()

    stream = Stream(producer, store=store)
    slow = stream.subscribe(0)
    stream.start()
    gevent.sleep(0.01)
    go.set()
    gevent.sleep(0.05)
    assert stream.buffered == 12  # persisted, but the reader has not taken them: kept
    events = slow.poll(0)
    assert [e.id for e in events] == list(range(1, 13))  # start, 10 deltas, block_end
    assert stream.buffered == 12  # still registered: it could still be holding them
    slow.close()
    assert stream.buffered == 1  # it left: trimmed to what the store has (the newest stays)
    go.set()
    stream.wait(1)


def test_catch_up_when_the_store_fails_cuts_the_reader() -> None:
    store = FlakyStore()

    def producer(ctx: ProducerContext) -> None:
        ctx.text(0, "x")
        ctx.end_block(0)
        ctx.sleep(10)

    stream = Stream(producer, store=store)
    stream.start()
    gevent.sleep(0.05)

    def broken(stream_id: str, after_id: int) -> StoredTurn:
        raise OSError("down")

    store.load_turn = broken  # type: ignore[method-assign]
    sub = stream.subscribe(0)
    assert sub.poll(1) == []
    assert sub.cut
    assert sub.done
    stream.cancel()


def test_a_reader_is_not_cut_for_what_arrived_while_it_read_the_store() -> None:
    """A slow store read (a loaded machine, a distant database) while the producer sends more
    than ``client_queue`` events is the server's lag, not the reader's: it is not cut, and it
    gets the whole turn once, then the live events."""
    store = FlakyStore()
    go_on = gevent.event.Event()

    def producer(ctx: ProducerContext) -> None:
        for i in range(10):
            ctx.text(0, f"a{i} ")
        ctx.end_block(0)
        go_on.wait()
        for i in range(60):  # during the reader's store read: more than client_queue
            ctx.text(1, f"b{i} ")
            ctx.sleep(0.001)
        ctx.end_block(1)

    stream = Stream(producer, store=store, client_queue=16, buffer_size=1000)
    stream.start()
    gevent.sleep(0.1)
    assert stream.trimmed_id > 1  # block 0 is persisted and trimmed: a reader at 0 asks the store
    read = store.inner.load_turn

    def slow_read(stream_id: str, after_id: int) -> StoredTurn:
        turn = read(stream_id, after_id)
        go_on.set()
        gevent.sleep(0.3)  # the producer sends block 1 meanwhile
        return turn

    store.load_turn = slow_read  # type: ignore[method-assign]
    cuts: list[bool] = []
    sub = stream.subscribe(0, on_cut=lambda: cuts.append(True))
    client = Transcript()
    with gevent.Timeout(5):
        while not sub.done:
            apply_all(client, sub.poll(1))
    assert not sub.cut
    assert cuts == []
    assert client.blocks == {0: "".join(f"a{i} " for i in range(10)),
                             1: "".join(f"b{i} " for i in range(60))}  # fmt: skip
    assert client.terminal == "done"
    assert client.ids == sorted(set(client.ids))


def test_registry_serves_forgotten_streams_from_the_store_and_ends_lost_ones() -> None:
    store = FlakyStore()
    registry = StreamRegistry(store=store.inner, retention=0.01)

    def producer(ctx: ProducerContext) -> dict[str, Any]:
        ctx.text(0, "hello ")
        ctx.text(1, "world")
        return {"ok": True}

    stream = registry.create(producer, producer_name="p")
    stream.wait(1)
    assert stream.saved.wait(2)
    gevent.sleep(0.05)
    assert registry.get(stream.id) is None  # forgotten from memory...
    found = registry.find(stream.id)  # ...but found in the store
    assert isinstance(found, StreamRecord)
    client = Transcript()
    apply_all(client, registry.replay(found, 0))
    assert client.text() == "hello world"
    assert client.events[0][1] == "start"
    assert client.terminal == "done"
    assert client.events[-1][2] == {"stream_id": stream.id, "ok": True}
    # A record left "running" by a dead process ends as lost, past any id it could have sent.
    orphan = StreamRecord("orphan", "p", "running", last_event_id=7, created_at=1.0)
    store.inner.save(orphan, [TurnBlock("orphan", 0, "text", "par", 2, 7)])
    ended = registry.find("orphan")
    assert isinstance(ended, StreamRecord)
    assert ended.state == "error"
    assert ended.terminal_id == 7 + LOST_ID_GAP
    assert ended.terminal_data == {"stream_id": "orphan", "message": "producer lost"}
    # The first terminal wins: a late "done" from the old owner changes nothing.
    store.inner.save(
        StreamRecord("orphan", "p", "done", 9, 1.0, terminal="done", terminal_id=9), []
    )
    again = store.inner.load_stream("orphan")
    assert again is not None
    assert again.state == "error"
    assert lost(orphan).terminal == "error"


def test_block_rows_only_move_forward() -> None:
    store = SQLStore("sqlite://")
    record = StreamRecord("s", "p", "running", 10, 1.0)
    store.save(record, [TurnBlock("s", 0, "text", "new content", 2, 10)])
    store.save(record, [TurnBlock("s", 0, "text", "old", 2, 5)])  # a late, older write
    assert store.load_blocks("s", 0)[0].content == "new content"
    assert store.load_blocks("s", 10) == []
    assert [b.block for b in store.load_blocks("s", 9)] == [0]


def test_producer_that_persists_its_own_way_uses_snapshot_and_trim() -> None:
    """A producer with its own store: it saves blocks itself, then trims what it saved."""
    own = SQLStore("sqlite://")
    trimmed: list[int] = []

    def producer(ctx: ProducerContext) -> None:
        for i in range(4):
            ctx.text(0, f"w{i} ")
        events = ctx.snapshot()
        assert [e.event for e in events] == ["start"] + ["text_delta"] * 4
        last = events[-1].id
        content = "".join(e.data["text"] for e in events if e.event == "text_delta")
        own.save(
            ctx_record(ctx.stream_id, last), [TurnBlock(ctx.stream_id, 0, "text", content, 2, last)]
        )
        trimmed.append(ctx.trim(last))
        ctx.text(1, "tail")

    def ctx_record(stream_id: str, last: int) -> StreamRecord:
        return StreamRecord(stream_id, "own", "running", last, 1.0)

    stream = Stream(producer, store=own)
    stream.start()
    stream.wait(1)
    assert trimmed == [4]  # start and the 4 deltas went; the newest event always stays
    client = Transcript()
    read_session(stream, client, 100)
    assert client.text() == "w0 w1 w2 w3 tail"
    assert client.events[0][1] == "start"
    assert client.events[1][1] == "turnblock_catchup"


def test_saves_of_many_streams_share_transactions_and_a_bad_one_fails_alone(
    tmp_path: Any,
) -> None:
    """Streams persisting at once go together into one transaction (one connection, one
    commit); a save that cannot be written fails only its own caller."""
    from sqlalchemy import event

    store = SQLStore(f"sqlite:///{tmp_path / 'group.sqlite3'}")
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))

    def save(i: int) -> str:
        record = StreamRecord(f"s{i}", "demo", "running", 3, 1.0)
        if i == 7:  # not JSON: this save cannot be written
            record = StreamRecord(f"s{i}", "demo", "running", 3, 1.0, metadata={"x": object()})
        try:
            store.save(record, [TurnBlock(f"s{i}", 0, "text", f"block {i}", 2, 3)])
        except Exception as exc:
            return type(exc).__name__
        return "ok"

    results = [g.get() for g in [gevent.spawn(save, i) for i in range(50)]]
    assert results.count("ok") == 49
    assert results[7] != "ok"
    for i in range(50):
        rows = store.load_blocks(f"s{i}", 0)
        assert [r.content for r in rows] == ([] if i == 7 else [f"block {i}"])
    commits.clear()
    good = [gevent.spawn(save, i) for i in range(100, 150)]
    assert [g.get() for g in good] == ["ok"] * 50
    assert len(commits) <= 3, "concurrent saves were not grouped"
    store.close()


def test_durable_catch_up_while_a_write_is_committed_but_not_yet_acknowledged() -> None:
    """The store can hold more than readers were shown: a write committed, its writer not yet
    resumed (SQLite's commit runs in a thread). A reader that catches up then gets the store's
    blocks, and must not get those events again once they are revealed."""
    store = FlakyStore()

    def producer(ctx: ProducerContext) -> None:
        ctx.text(0, "a")
        ctx.end_block(0)
        ctx.sleep(0.05)  # saved, revealed, trimmed
        store.ack_delay = 0.3
        ctx.text(1, "b")
        ctx.end_block(1)  # saved at once, acknowledged 0.3 s later
        ctx.sleep(0.6)

    stream = Stream(producer, buffer_size=1, store=store, durable=True)
    stream.start()
    with gevent.Timeout(10):
        while store.saves < 3 or not store.ack_delay:  # the record, block 0, then block 1
            gevent.sleep(0.005)
        client = Transcript()
        sub = stream.subscribe(0)
        while not sub.done:
            for e in sub.poll(1):
                assert e.id > client.last_id, f"{e} again after {client.last_id}"
                client.apply(e.id, e.event, e.data)
    sub.close()
    assert [b["content"] for _, b in sorted(client.turn.items())] == ["a", "b"]
