"""The Python client against a real server, through a proxy that cuts connections anywhere."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from sse_blueprint.client import (
    Backoff,
    CircuitBreaker,
    CircuitOpenError,
    RequestRejected,
    RetriesExhausted,
    StreamClient,
    StreamFinished,
    StreamNotFound,
)
from tests.conftest import (
    DEMO_TEXT,
    LIVE_APP,
    CuttingProxy,
    LiveServer,
    free_port,
    start_demo,
    start_stream,
    wait_done,
)


@pytest.fixture(autouse=True)
def close_clients(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Close every client a test makes: idle keep-alive connections hold up server shutdown."""
    made: list[StreamClient] = []
    original = StreamClient.__init__

    def tracking_init(self: StreamClient, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(StreamClient, "__init__", tracking_init)
    yield
    for client in made:
        client.close()


@pytest.mark.parametrize("seed", range(10))
def test_text_is_exact_through_random_cuts(server: LiveServer, seed: int) -> None:
    stream_id = start_demo(server.url, chunk_size=3, interval_ms=3)
    proxy = CuttingProxy(server.url, seed)
    try:
        client = StreamClient(
            proxy.url,
            sleep=lambda s: time.sleep(min(s, 0.01)),  # the policy itself is tested below
            breaker=CircuitBreaker(threshold=10_000),
            rng=random.Random(seed),
        )
        reader = client.open(stream_id)
        ids = [event.id for event in reader]
    finally:
        proxy.close()
    assert reader.text() == DEMO_TEXT
    assert reader.state == "done"
    assert ids == sorted(set(ids))
    assert proxy.cuts >= 1
    assert reader.metrics.reconnects == proxy.connections - 1
    assert reader.metrics.events == len(ids)
    assert reader.retry_hint == 1.5  # the server's retry: 1500
    assert reader.metrics.time_to_first_event is not None


def test_reader_follows_a_live_stream_and_counts(server: LiveServer) -> None:
    client = StreamClient(server.url)
    reader = client.start("demo", {"text": DEMO_TEXT, "chunk_size": 11, "interval_ms": 2})
    events = list(reader)
    assert reader.text() == DEMO_TEXT
    assert events[0].event == "start"
    assert events[-1].event == "done"
    assert reader.metrics.reconnects == 0
    assert reader.metrics.bytes > len(DEMO_TEXT.encode())
    assert client.status(reader.stream_id)["state"] == "done"


def test_errors_have_their_own_exceptions(server: LiveServer) -> None:
    client = StreamClient(server.url)
    with pytest.raises(StreamNotFound):
        list(client.open("AAAAAAAAAAAAAAAAAAAAAA"))
    with pytest.raises(RequestRejected) as rejected:
        client.start("no-such-producer")
    assert rejected.value.status == 400
    assert "unknown producer" in rejected.value.message
    stream_id = start_demo(server.url, interval_ms=0)
    wait_done(server.url, stream_id)
    terminal_id = client.status(stream_id)["last_event_id"]
    with pytest.raises(StreamFinished):
        list(client.open(stream_id, terminal_id))


def test_cancelled_and_failed_streams_end_the_iteration(server: LiveServer) -> None:
    client = StreamClient(server.url)
    reader = client.start("demo", {"text": DEMO_TEXT, "chunk_size": 1, "interval_ms": 20})
    for event in reader:
        if event.event == "text_delta":
            client.cancel(reader.stream_id)
    assert reader.state == "cancelled"
    failed = client.start("fail", {"visible": True})
    list(failed)
    assert failed.state == "error"
    assert failed.terminal is not None
    assert failed.terminal.data["message"] == "the model refused"


def test_breaker_opens_while_the_server_is_down_and_recovers(server_factory: Any) -> None:
    port = free_port()
    now = [1000.0]
    breaker = CircuitBreaker(threshold=3, cooldown=30, clock=lambda: now[0])
    client = StreamClient(f"http://127.0.0.1:{port}", breaker=breaker)
    for _ in range(3):
        with pytest.raises(httpx.ConnectError):
            client.start("demo", {"text": "x"})
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as opened:
        client.start("demo", {"text": "x"})  # fails fast: no connection attempted
    assert opened.value.retry_after == pytest.approx(30)
    now[0] += 31  # cool-down over: half-open lets one attempt through...
    with pytest.raises(httpx.ConnectError):
        client.start("demo", {"text": "x"})
    assert breaker.state == "open"  # ...which failed: open again
    server_factory({}, app=LIVE_APP, port=port)  # the server comes back
    now[0] += 31
    reader = client.start("demo", {"text": "back", "interval_ms": 0})
    assert breaker.state == "closed"
    assert [e.event for e in reader][-1] == "done"
    # (deltas, or one catch-up if the stream was persisted before the reader came: either way)
    assert reader.text() == "back"


def test_breaker_is_shared_per_base_url() -> None:
    a = StreamClient("http://127.0.0.1:9/")
    b = StreamClient("http://127.0.0.1:9")
    c = StreamClient("http://127.0.0.1:10")
    assert a.breaker is b.breaker
    assert a.breaker is not c.breaker


def test_backoff_follows_the_policy_with_an_injected_clock() -> None:
    slept: list[float] = []
    port = free_port()  # nothing listens: every attempt fails
    client = StreamClient(
        f"http://127.0.0.1:{port}",
        backoff=Backoff(base=0.5, cap=4.0),
        breaker=CircuitBreaker(threshold=1000),
        max_retries=7,
        sleep=slept.append,
        rng=random.Random(42),
    )
    with pytest.raises(RetriesExhausted):
        list(client.open("AAAAAAAAAAAAAAAAAAAAAA"))
    assert len(slept) == 7
    expected_rng = random.Random(42)
    for attempt, delay in enumerate(slept, start=1):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert 0 <= delay <= ceiling
        assert delay == expected_rng.uniform(0, ceiling)  # full jitter, exactly


def test_backoff_uses_the_servers_retry_hint_as_base() -> None:
    policy = Backoff(base=0.5, cap=10.0)
    rng = random.Random(1)
    draws = [policy.delay(n, rng, hint=2.0) for n in range(6)]
    check = random.Random(1)
    assert draws == [check.uniform(0, min(10.0, 2.0 * 2**n)) for n in range(6)]
    assert max(policy.delay(30, random.Random(n)) for n in range(200)) <= 10.0


def test_breaker_state_machine() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=5, clock=lambda: now[0])
    breaker.failure()
    assert breaker.state == "closed"
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed"  # a success in between resets the count
    breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        breaker.before()
    now[0] = 5
    breaker.before()
    assert breaker.state == "half-open"
    with pytest.raises(CircuitOpenError):
        breaker.before()  # one trial at a time
    breaker.success()
    assert breaker.state == "closed"


def run_tail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sse_blueprint.client", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sse_tail_prints_the_text_and_exits_0(server: LiveServer) -> None:
    stream_id = start_demo(server.url, chunk_size=4, interval_ms=2)
    done = run_tail(f"{server.url}/api/streams/{stream_id}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == DEMO_TEXT + "\n"
    as_json = run_tail(f"{server.url}/api/streams/{stream_id}", "--json")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[-1]["event"] == "done"
    assert {"id", "event", "data"} == set(events[0])
    started = run_tail(server.url, "--start", "demo", "--input", '{"text": "hi", "interval_ms": 0}')
    assert started.returncode == 0
    assert started.stdout == "hi\n"


def test_sse_tail_exit_codes(server: LiveServer) -> None:
    assert run_tail(f"{server.url}/api/streams/AAAAAAAAAAAAAAAAAAAAAA").returncode == 4
    assert run_tail(server.url, "--start", "nope").returncode == 2
    assert run_tail(server.url, "--start", "fail").returncode == 1
    assert (
        run_tail(f"http://127.0.0.1:{free_port()}/api/streams/x", "--max-retries", "1").returncode
        == 5
    )
    stream_id = start_demo(server.url, chunk_size=1, interval_ms=50)
    tail = subprocess.Popen(
        [sys.executable, "-m", "sse_blueprint.client", f"{server.url}/api/streams/{stream_id}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})
    assert tail.wait(timeout=30) == 3


def test_sse_tail_stops_quietly_when_its_output_is_closed(server: LiveServer) -> None:
    """``sse-tail URL --json | head -5``: head exits after 5 lines; sse-tail used to end in a
    BrokenPipeError traceback."""
    # App events, one every 50 ms for 30 s: all kept in the buffer (there is no text block to
    # persist), so sse-tail gets many however late it starts, and head goes before the end.
    events = [["tick", {"n": n}] for n in range(600)]
    stream_id = start_stream(server.url, "named", events=events, interval_ms=50, text="end")
    url = f"{server.url}/api/streams/{stream_id}"
    piped = subprocess.run(
        f"{sys.executable} -m sse_blueprint.client {url} --json | head -5; "
        'echo "status=${PIPESTATUS[0]}" >&2',
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert len(piped.stdout.splitlines()) == 5
    assert "Traceback" not in piped.stderr
    assert "status=141" in piped.stderr
    httpx.post(f"{server.url}/api/streams/{stream_id}/cancel", json={})


def test_sse_tail_fails_fast_when_nothing_answers() -> None:
    """A server that never answered is exit 5 at once, not after 20 backed-off retries."""
    began = time.monotonic()
    gone = run_tail(f"http://127.0.0.1:{free_port()}/api/streams/x")  # default --max-retries
    assert gone.returncode == 5
    assert "unreachable" in gone.stderr
    assert time.monotonic() - began < 10


def test_sse_tail_names_the_flag_in_errors(server: LiveServer) -> None:
    bad = run_tail(server.url, "--start", "demo", "--input", "notjson")
    assert bad.returncode == 2
    assert "--input is not JSON" in bad.stderr
    not_object = run_tail(server.url, "--start", "demo", "--input", "[1]")
    assert not_object.returncode == 2
    assert "--input must be a JSON object" in not_object.stderr
