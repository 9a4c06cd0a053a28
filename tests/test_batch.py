"""Group commit: many greenlets' items written in few batches, each outcome to its caller."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import gevent
import pytest

from sse_blueprint._batch import Batcher


def test_items_waiting_together_go_in_one_write_and_each_gets_its_outcome() -> None:
    batches: list[list[int]] = []

    def write(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        gevent.sleep(0.01)  # a round trip: the next batch gathers meanwhile
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(write)
    jobs = [gevent.spawn(batcher.submit, i) for i in range(50)]
    gevent.joinall(jobs)
    assert sorted(i for b in batches for i in b) == list(range(50))  # each item written once
    assert len(batches) <= 3  # (the first alone, then everything that waited meanwhile)
    for i, job in enumerate(jobs):
        if i % 2:
            assert isinstance(job.exception, ValueError)
            assert str(job.exception) == f"odd {i}"
        else:
            assert job.value == i * 10


def test_a_failed_write_fails_its_batch_only_and_a_killed_writer_is_replaced() -> None:
    calls: list[list[str]] = []
    writers: list[gevent.Greenlet[Any, Any]] = []  # the greenlet that runs each write

    def write(items: Sequence[str]) -> list[str | BaseException]:
        calls.append(list(items))
        writers.append(gevent.getcurrent())
        if "boom" in items:
            raise ConnectionError("down")
        if "slow" in items:
            gevent.sleep(10)
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(write, max_batch=1)
    with pytest.raises(ConnectionError):
        batcher.submit("boom")
    assert batcher.submit("fine") == "FINE"
    slow = gevent.spawn(batcher.submit, "slow")
    waiting = gevent.spawn(batcher.submit, "after")
    gevent.sleep(0.01)
    writers[-1].kill()  # the slow write's (as a worker's exit would)
    gevent.joinall([slow, waiting], timeout=2)
    assert isinstance(slow.exception, RuntimeError)
    assert waiting.value == "AFTER"  # served by a new writer


def test_enqueued_items_are_answered_through_their_callbacks_even_if_one_fails() -> None:
    def write(items: Sequence[int]) -> list[int | BaseException]:
        gevent.sleep(0.005)
        return [ValueError(i) if i == 3 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(write)
    answers: dict[int, object] = {}

    def answered(i: int, outcome: int | BaseException) -> None:
        answers[i] = outcome
        if i == 5:
            raise RuntimeError("a callback that fails")  # logged; the others still answered

    for i in range(10):
        batcher.enqueue(i, partial(answered, i))
    assert answers == {}  # nothing is written before the loop turns
    assert batcher.submit(10) == 100  # (after the others: one writer, in order)
    assert sorted(answers) == list(range(10))
    assert isinstance(answers[3], ValueError)
    assert all(answers[i] == i * 10 for i in range(10) if i != 3)
