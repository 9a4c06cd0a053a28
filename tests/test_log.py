"""The live buffer on its own: positions stay valid across trims, against a plain list model."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sse_blueprint.engine import Event
from sse_blueprint.engine.log import EventLog

steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 3)),  # the gap to the next id
        st.tuples(st.just("drop"), st.integers(0, 40), st.integers(0, 40)),
    ),
    max_size=60,
)


@given(steps)
def test_positions_and_trims_match_a_list_of_every_event(script: list[tuple[Any, ...]]) -> None:
    log = EventLog()
    every: list[Event] = []  # every event ever appended: position p is every[p]
    for step in script:
        if step[0] == "append":
            ev = Event(log.last_id + step[1], "tick", {})
            log.append(ev)
            every.append(ev)
            log.visible = log.end
        else:
            _, up_to_id, keep_from = step
            base = log.base
            dropped = log.drop(up_to_id, keep_from)
            gone = [e for e in every[base:] if e.id <= up_to_id][: max(0, keep_from - base)]
            assert dropped == len(gone)
            if gone:
                assert log.trimmed_id == gone[-1].id
        assert log.events == every[log.base : log.end]
        assert log.end == len(every)
        assert log.last_id == (every[-1].id if every else 0)
        for probe in (0, 1, log.last_id // 2, log.last_id, log.last_id + 1):
            first_after = next((p for p, e in enumerate(every) if e.id > probe), len(every))
            assert log.position_after(probe) == max(first_after, log.base)
            assert log.after(probe) == [e for e in log.events if e.id > probe]
        for pos in range(log.base, log.end + 1):
            assert log.visible_from(pos) == every[pos : log.visible]


def test_a_log_that_starts_later_counts_what_came_before_as_trimmed() -> None:
    log = EventLog()
    log.start_at(10)
    assert (log.trimmed_id, log.last_id, log.trim_to, len(log)) == (9, 9, 9, 0)
    log.append(Event(10, "tick", {}))
    assert log.after(9)[0].id == 10
