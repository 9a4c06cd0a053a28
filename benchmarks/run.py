"""Run every benchmark, side by side with the peers, and write the table and the plot.

    make bench                      # or: .venv/bin/python -m benchmarks.run [--quick]

Loopback only; every server and client is a child process stopped at the end. Writes
``benchmarks/results/results.md``, ``results.json``, ``fanout.png`` and ``chat.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks import spy
from benchmarks.common import OUT, PY, ROOT, Server, free_port, raise_fd_limit

GUNICORN = [PY, "-m", "gunicorn", "-k", "gevent", "--worker-connections", "20000"]
#: When this run began (UTC): each chat row says which run measured it.
RUN_STARTED = time.strftime("run of %Y-%m-%d %H:%M UTC", time.gmtime())


# -- servers -------------------------------------------------------------------------------------


def ours(workers: int = 1, **env: str) -> Server:
    port = free_port()
    config = {"FLASK_SSE_DATABASE_URL": f"sqlite:///{OUT}/ours-{uuid.uuid4().hex[:8]}.sqlite3"}
    config.update(env)
    cmd = [
        PY, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers), "--worker-connections", "20000", "benchmarks.apps.ours:app",
    ]  # fmt: skip
    return Server(f"ours-{workers}w", cmd, port, config)


def flasksse(redis_url: str) -> Server:
    port = free_port()
    cmd = [*GUNICORN, "--bind", f"127.0.0.1:{port}", "benchmarks.apps.flasksse:app"]
    return Server("flask-sse", cmd, port, {"BENCH_REDIS_URL": redis_url})


def starlette() -> Server:
    port = free_port()
    cmd = [
        PY, "-m", "uvicorn", "benchmarks.apps.starlette_app:app", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--backlog", "4096",
    ]  # fmt: skip
    return Server("sse-starlette", cmd, port, {})


def resumable(redis_url: str) -> Server:
    """vercel's resumable-stream on Node (npm), installed into benchmarks/node on first use."""
    node_dir = ROOT / "benchmarks" / "node"
    if not (node_dir / "node_modules" / "resumable-stream").exists():
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund"],
            cwd=node_dir, check=True, timeout=300,
        )  # fmt: skip
    port = free_port()
    cmd = ["node", str(node_dir / "resumable.mjs"), str(port), redis_url]
    return Server("resumable-stream", cmd, port, {})


def bare() -> Server:
    port = free_port()
    return Server("bare-gevent", [PY, "-m", "benchmarks.apps.bare", str(port)], port, {})


@contextlib.contextmanager
def serving(make: Callable[[], Server]) -> Iterator[Server]:
    server = make()
    try:
        yield server
    finally:
        server.stop()


class Target:
    """How to follow and to trigger the same event sequence on one server."""

    def __init__(self, server: Server, kind: str) -> None:
        self.server, self.kind = server, kind
        self.go = ""

    def prepare(self, count: int, pad: int, interval_ms: float = 0) -> str:
        """Return the URL the clients follow."""
        base = self.server.url
        if self.kind == "ours":
            self.go = os.path.join(tempfile.gettempdir(), f"sse-bench-go-{uuid.uuid4().hex}")
            body = {"count": count, "pad": pad, "go": self.go, "interval_ms": interval_ms}
            r = httpx.post(f"{base}/api/streams", json={"producer": "ticks", "input": body})
            r.raise_for_status()
            return base + r.json()["stream_url"]
        self.trigger_url = (
            f"{base}/publish?count={count}&pad={pad}&interval_ms={interval_ms}"
        )  # fmt: skip
        return base + ("/stream?channel=sse" if self.kind == "flask-sse" else "/stream")

    def trigger(self) -> None:
        if self.kind == "ours":
            Path(self.go).touch()
        else:
            httpx.post(self.trigger_url, timeout=120)

    def cleanup(self) -> None:
        if self.go:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.go)


def connected_load_client(args: list[str]) -> subprocess.Popen[str]:
    """Start the load client with ``args`` and wait until all its clients are connected."""
    proc = subprocess.Popen(
        [PY, "-m", "benchmarks.loadclient", *args],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit,
    )  # fmt: skip
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    if not ready.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"load client failed: {ready!r}")
    return proc


def load(
    url: str, clients: int, expect: int, timeout: float, trigger: Callable[[], None]
) -> dict[str, Any]:
    """Run the load client: connect everyone, trigger, collect the verified result."""
    out = OUT / f"client-{uuid.uuid4().hex[:8]}.json"
    proc = connected_load_client(
        [url, "--clients", str(clients), "--expect", str(expect), "--timeout", str(timeout),
         "--out", str(out)]
    )  # fmt: skip
    time.sleep(0.5)
    trigger()
    proc.wait(timeout=timeout + 120)
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    result["completeness"] = result["verified"] / result["expected"] if result["expected"] else 0
    return result


# -- scenarios -----------------------------------------------------------------------------------


def fanout(
    target: Target, clients: int, count: int, pad: int, interval_ms: float = 0
) -> dict[str, Any]:
    url = target.prepare(count, pad, interval_ms)
    timeout = 60 + count * interval_ms / 1000
    try:
        return load(url, clients, count, timeout, target.trigger)
    finally:
        target.cleanup()


def chat_rows(
    args: argparse.Namespace, postgres: Any, redis_url: str, cluster: Any
) -> dict[str, Any]:
    """The chat shape on a ramp of stream counts: ours on SQLite, on PostgreSQL, with Redis and
    with a 3-shard Redis Cluster (and PostgreSQL), the peers beside them; one worker (one
    process) each."""
    postgres_url = postgres.url
    ramp = (100, 300) if args.quick else (100, 500, 1000, 2000, 3000, 5000)
    if args.streams:
        ramp = tuple(int(n) for n in args.streams.split(","))
    configs: list[tuple[str, Callable[[], Server], str]] = [
        ("SQLite", ours, "ours"),
        ("PostgreSQL", lambda: ours(1, FLASK_SSE_DATABASE_URL=postgres_url), "ours"),
        # Two workers: the kernel hands each reader to either, so about half the tokens reach
        # their reader through the other worker's mirror (Pub/Sub): what a deployment pays.
        *(
            (
                f"{name}{suffix}",
                partial(
                    ours, workers, FLASK_SSE_DATABASE_URL=postgres_url, FLASK_SSE_REDIS_URL=url
                ),
                "ours",
            )
            for workers, suffix in ((1, ""), (2, " (2 workers)"))
            for name, url in (("Redis", redis_url), ("Redis Cluster", cluster.url))
        ),
        ("bare-gevent", bare, "bare"),
        ("sse-starlette", starlette, "sse-starlette"),
        ("resumable-stream", lambda: resumable(redis_url), "resumable-stream"),
    ]
    wanted = set(filter(None, args.servers.split(",")))
    # One reader per stream along the ramp; more readers (a second tab) at 1,000 streams.
    readers_extra = [int(r) for r in args.readers.split(",") if int(r) > 1]
    rows: dict[str, Any] = {}
    for name, make, kind in configs:
        if wanted and name not in wanted:
            continue
        runs = [(n, 1) for n in ramp]
        runs += [(n, r) for r in readers_extra for n in (1000,) if n in ramp]
        for streams, readers in runs:
            shards = [f"redis://127.0.0.1:{p}" for p in cluster.ports]
            nodes = shards if name.startswith("Redis Cluster") else []
            nodes = [redis_url] if name.startswith("Redis") and not nodes else nodes
            with serving(make) as server:
                redis0 = redis_figures(nodes)
                on_pg = name.startswith(("PostgreSQL", "Redis"))
                row = chat_shape(
                    server, streams, readers, kind, postgres=postgres.data if on_pg else None
                )
                if nodes:
                    row.update(redis_cost(redis0, redis_figures(nodes), streams * 300))
            row["run"] = RUN_STARTED
            key = f"{name}, {streams} streams" + (f" x {readers} readers" if readers > 1 else "")
            rows[key] = row
            print("chat", key, row, flush=True)
    return rows


def redis_figures(urls: list[str]) -> tuple[int, float, int]:
    """Commands the Redis servers (every node of a cluster) have run, the CPU seconds they
    have used, and the script calls they have run (``EVALSHA`` that did not fail), so far."""
    import redis

    calls, cpu_s, scripts = 0, 0.0, 0
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            stats = client.info("commandstats")
            cpu = client.info("cpu")
        finally:
            client.close()
        calls += sum(int(v["calls"]) for v in stats.values())
        cpu_s += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        evalsha = stats.get("cmdstat_evalsha", {})
        scripts += int(evalsha.get("calls", 0)) - int(evalsha.get("failed_calls", 0))
    return calls, cpu_s, scripts


def redis_cost(
    before: tuple[int, float, int], after: tuple[int, float, int], sent: int
) -> dict[str, float]:
    return {
        "redis_commands_per_token": (after[0] - before[0]) / sent,
        "redis_cpu_us_per_token": (after[1] - before[1]) / sent * 1e6,
        "redis_script_calls_per_token": (after[2] - before[2]) / sent,
    }


def postgres_cpu_seconds(data: Path) -> float:
    """CPU time a PostgreSQL server has used so far: its postmaster's own and its exited
    children's (reaped, so counted in the postmaster's ``cutime``/``cstime``), and its live
    backends'."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rpartition(")")[2].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
    ).stdout.split()
    return ticks / os.sysconf("SC_CLK_TCK") + cpu_seconds([int(c) for c in children])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def chat_shape(
    server: Server,
    streams: int,
    readers: int,
    kind: str = "ours",
    tokens: int = 300,
    rate: float = 30,
    postgres: Path | None = None,
) -> dict[str, Any]:
    """``streams`` concurrent chat streams, ``readers`` each, ``tokens`` at ``rate`` per second
    (with ``postgres``, the data directory of the server ours writes to: its CPU is measured).

    Ours (``kind="ours"``): blocks of 80 tokens with a tool call after every third block, every
    block persisted. The peers stream the same text deltas from one producer per stream to
    their readers, with no blocks and no persistence (they have neither).
    """
    ours = kind == "ours"
    go = os.path.join(tempfile.gettempdir(), f"sse-bench-go-{uuid.uuid4().hex}")
    rss_before = server.rss_kb()
    urls = [f"/chat/{k}" for k in range(streams)]
    if ours:
        urls = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(streams):
                r = client.post(
                    "/api/streams",
                    json={"producer": "chat", "input": {"tokens": tokens, "rate": rate, "go": go}},
                )
                r.raise_for_status()
                urls.append(r.json()["stream_url"])
    paths = OUT / f"paths-{uuid.uuid4().hex[:8]}.txt"
    paths.write_text("".join(f"{url}\n" for url in urls for _ in range(readers)))
    out = OUT / f"client-{uuid.uuid4().hex[:8]}.json"
    schedule = tokens / rate
    proc = connected_load_client(
        [server.url, "--paths", str(paths), "--expect", str(tokens), "--timeout",
         str(schedule * 20 + 30), "--out", str(out), "--connect-rate", "3000"]
    )  # fmt: skip
    time.sleep(1)
    rss_after = server.rss_kb()
    db0 = httpx.get(f"{server.url}/bench/db").json() if ours else {}
    cpu0 = cpu_seconds(server.worker_pids())
    db_cpu0 = postgres_cpu_seconds(postgres) if postgres else 0.0
    spies = []
    if ours and os.environ.get("BENCH_PYSPY"):  # (see benchmarks/spy.py)
        profile = (
            Path(os.environ["BENCH_PYSPY"]) / f"chat-{streams}x{readers}-{uuid.uuid4().hex[:6]}.txt"
        )
        spies = spy.record(server.worker_pids(), schedule, profile)
    if ours:
        Path(go).touch()
    else:
        query = f"streams={streams}&tokens={tokens}&rate={rate}"
        httpx.post(f"{server.url}/publish_chat?{query}", timeout=60).raise_for_status()
    proc.wait(timeout=schedule * 20 + 150)
    cpu = cpu_seconds(server.worker_pids()) - cpu0
    for p in spies:
        p.wait(timeout=60)
    if spies:
        print(spy.summary(sorted(profile.parent.glob(profile.name + "*"))), flush=True)
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    paths.unlink()
    sent = streams * tokens
    figures: dict[str, Any] = {
        "streams": streams,
        "readers": readers,
        "offered_tokens_per_s": streams * rate,
        "delivered_tokens_per_s": result["verified"] / readers / result["seconds"],
        "on_schedule": min(1.0, schedule / result["seconds"]) if result["seconds"] else 0.0,
        "completeness": result["verified"] / (sent * readers),
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "server_cpu_us_per_token": cpu / sent * 1e6,
        "rss_kb_per_stream": (rss_after - rss_before) / streams,
        "client_cpu": result["client_cpu"],
        "errors": result["errors"],
    }
    if ours:
        os.remove(go)
        figures.update(persistence(server, db0, sent))
        if len(server.worker_pids()) > 1:  # (each worker counts its own statements and blocks)
            for key in ("db_statements_per_token", "db_bytes_per_token", "persist_lag_s"):
                figures.pop(key)
        if postgres:  # (after the lag: every block is written by then)
            figures["db_cpu_us_per_token"] = (postgres_cpu_seconds(postgres) - db_cpu0) / sent * 1e6
        figures["gc"] = httpx.get(f"{server.url}/bench/gc").json()
    return figures


def persistence(server: Server, db0: dict[str, int], sent: int) -> dict[str, Any]:
    """Database figures of a chat run: statements and bytes per token, and the persistence lag
    (once the readers have everything, how long until every ended block is a complete row; 0
    when the database kept up with the blocks as they ended)."""
    db1 = httpx.get(f"{server.url}/bench/db").json()
    at_end = httpx.get(f"{server.url}/bench/persisted", timeout=30).json()
    now, began = at_end, time.monotonic()
    while now["stored"] < now["ended"] and time.monotonic() - began < 120:
        time.sleep(0.05)
        now = httpx.get(f"{server.url}/bench/persisted", timeout=30).json()
    lag = time.monotonic() - began if at_end["stored"] < at_end["ended"] else 0.0
    return {
        "db_statements_per_token": (db1["statements"] - db0["statements"]) / sent,
        "db_bytes_per_token": (db1["bytes"] - db0["bytes"]) / sent,
        "blocks_ended": now["ended"],
        "blocks_stored_at_end": at_end["stored"] / max(1, at_end["ended"]),
        "persist_lag_s": lag,
        "blocks_stored": now["stored"] / max(1, now["ended"]),
    }


def idle_connections(make: Callable[[], Server], kind: str, clients: int) -> dict[str, Any]:
    """Hold ``clients`` idle event streams on one worker; RSS per connection."""
    with serving(make) as server:
        target = Target(server, kind)
        url = target.prepare(1, 0)
        if kind == "ours":  # a stream that stays open and sends nothing
            r = httpx.post(f"{server.url}/api/streams", json={"producer": "idle", "input": {}})
            url = server.url + r.json()["stream_url"]
        time.sleep(1)
        before = server.rss_kb()
        proc = subprocess.Popen(
            [PY, "-m", "benchmarks.loadclient", url, "--clients", str(clients), "--idle",
             "--connect-rate", "3000"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=raise_fd_limit,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdin is not None
        ready = proc.stdout.readline()
        connected = int(ready.split()[1]) if ready.startswith("READY") else 0
        time.sleep(2)
        after = server.rss_kb()
        proc.stdin.close()
        proc.wait(timeout=60)
        target.cleanup()
    return {
        "connected": connected,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after / 1024,
        "kb_per_connection": (after - before) / connected if connected else float("nan"),
    }


def catch_up(server: Server, samples: int = 200, blocks: int = 1000) -> dict[str, Any]:
    """Reconnect → first catch-up byte, from the buffer and from the database."""
    import socket

    def first_byte(stream_url: str, last_id: int) -> float:
        host, port = "127.0.0.1", server.port
        began = time.perf_counter()
        with socket.create_connection((host, port)) as sock:
            sock.sendall(
                f"GET {stream_url} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {last_id}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = b""
            while True:  # the first event after the headers and the retry: line
                data += sock.recv(65536)
                body = data.partition(b"\r\n\r\n")[2]
                if b"id: " in body:
                    return time.perf_counter() - began

    base = server.url
    # From the buffer: a running stream whose events are all still buffered.
    go = os.path.join(tempfile.gettempdir(), f"sse-bench-go-{uuid.uuid4().hex}")
    r = httpx.post(
        f"{base}/api/streams",
        json={"producer": "blocks", "input": {"count": 500, "go": go}},
    )
    live = r.json()["stream_url"]
    time.sleep(1)
    buffer_times = [first_byte(live, 250) for _ in range(samples)]
    Path(go).touch()
    # From the database: a finished stream of `blocks` persisted blocks, resumed from id 1.
    r = httpx.post(
        f"{base}/api/streams",
        json={"producer": "blocks", "input": {"count": blocks, "persist": True}},
    )
    done = r.json()["stream_url"]
    for _ in range(100):
        if httpx.get(base + done + "/status").json()["state"] != "running":
            break
        time.sleep(0.1)
    time.sleep(1)
    db_times = [first_byte(done, 1) for _ in range(samples)]
    os.remove(go)

    def summary(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {
            "p50_ms": values[len(values) // 2] * 1000,
            "p99_ms": values[int(len(values) * 0.99) - 1] * 1000,
        }

    return {"buffer": summary(buffer_times), "database": summary(db_times)}


def encoding() -> dict[str, Any]:
    out = OUT / "encoding.json"
    subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_encoding.py",
         f"--benchmark-json={out}", "--benchmark-min-rounds=20"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    data = json.loads(out.read_text())
    return {b["name"].removeprefix("test_"): b["stats"]["median"] * 1e9 for b in data["benchmarks"]}


# -- report --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer clients and events")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--streams", default="", help="chat: the ramp, e.g. 100,2000")
    parser.add_argument("--servers", default="", help="chat: e.g. SQLite,bare-gevent (default all)")
    parser.add_argument("--readers", default="1,2", help="chat: readers per stream, e.g. 1,2")
    args = parser.parse_args()
    raise_fd_limit()
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    clients, count = (200, 100) if args.quick else (1000, 500)
    idle_n = 2000 if args.quick else 15000
    results: dict[str, Any] = {"machine": machine(), "clients": clients, "events": count}
    if only and (OUT / "results.json").exists():  # a partial run updates the last full one
        results = {**json.loads((OUT / "results.json").read_text()), "machine": machine()}

    sys.path.insert(0, str(ROOT))
    from tests.conftest import PostgresServer, RedisServer
    from tests.helpers.redis_topologies import LocalCluster

    redis_server = RedisServer().start()
    cluster = LocalCluster(primaries=3).start()
    postgres = PostgresServer().init()
    try:
        if not only or "fanout" in only:
            results["fanout"] = {}
            for name, make in (
                ("sse-blueprint", ours),
                ("sse-starlette", starlette),
                ("flask-sse", lambda: flasksse(redis_server.url)),
                ("bare-gevent", bare),
            ):
                kind = {"sse-blueprint": "ours"}.get(name, name)
                with serving(make) as server:
                    fanout(Target(server, kind), 50, 20, 64)  # warm up
                    results["fanout"][name] = fanout(Target(server, kind), clients, count, 64)
                print(name, results["fanout"][name], flush=True)
        if not only or "paced" in only:
            results["paced"] = {}
            for name, make in (("sse-blueprint", ours), ("sse-starlette", starlette),
                               ("bare-gevent", bare)):  # fmt: skip
                kind = {"sse-blueprint": "ours"}.get(name, name)
                with serving(make) as server:
                    fanout(Target(server, kind), 50, 20, 64)
                    results["paced"][name] = fanout(
                        Target(server, kind), clients, count, 64, interval_ms=10
                    )
                print("paced", name, results["paced"][name], flush=True)
        if not only or "redis" in only:
            results["redis"] = {}
            for workers in (1, 2):
                env = {
                    "FLASK_SSE_REDIS_URL": redis_server.url,
                    "FLASK_SSE_DATABASE_URL": postgres.url,
                }
                with serving(lambda w=workers, e=env: ours(w, **e)) as server:
                    fanout(Target(server, "ours"), 50, 20, 64)
                    results["redis"][f"{workers} worker(s)"] = fanout(
                        Target(server, "ours"), clients, count, 64
                    )
                print("redis", workers, results["redis"][f"{workers} worker(s)"], flush=True)
        if not only or "delivery" in only:
            # SSE_DELIVERY: live (readers get an event at once) against durable (only once the
            # database has it), paced like a model's tokens, to a few readers each.
            results["delivery"] = {}
            for db, db_env in (
                ("SQLite", {}),
                ("PostgreSQL", {"FLASK_SSE_DATABASE_URL": postgres.url}),
            ):
                for mode in ("live", "durable"):
                    env = {**db_env, "FLASK_SSE_DELIVERY": mode}
                    with serving(lambda e=env: ours(1, **e)) as server:
                        fanout(Target(server, "ours"), 10, 20, 64)
                        key = f"{mode}, {db}"
                        results["delivery"][key] = fanout(
                            Target(server, "ours"), 10, 300, 64, interval_ms=20
                        )
                    print("delivery", key, results["delivery"][key], flush=True)
        if not only or "catchup" in only:
            results["catchup"] = {}
            for db, env in (
                ("SQLite", {}),
                ("PostgreSQL", {"FLASK_SSE_DATABASE_URL": postgres.url}),
            ):
                with serving(lambda e=env: ours(1, **e)) as server:
                    results["catchup"][db] = catch_up(server, samples=50 if args.quick else 200)
                print("catch-up", db, results["catchup"][db], flush=True)
        if not only or "chat" in only:
            rows = chat_rows(args, postgres, redis_server.url, cluster)
            # (A run of some servers or stream counts updates the rows of the last full run.)
            partial = args.servers or args.streams
            results["chat"] = {**results.get("chat", {}), **rows} if partial else rows
        if not only or "idle" in only:
            results["idle"] = {}
            for name, make, kind in (
                ("sse-blueprint", ours, "ours"),
                ("sse-starlette", starlette, "sse-starlette"),
                ("bare-gevent", bare, "bare-gevent"),
            ):
                results["idle"][name] = idle_connections(make, kind, idle_n)
                print("idle", name, results["idle"][name], flush=True)
        if not only or "encoding" in only:
            results["encoding_ns"] = encoding()
            print("encoding", results["encoding_ns"], flush=True)
    finally:
        redis_server.remove()
        cluster.remove()
        postgres.remove()
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    from benchmarks.report import write_report

    write_report(results, OUT)
    print(f"wrote {OUT / 'results.md'}, {OUT / 'fanout.png'} and {OUT / 'chat.png'}")


if __name__ == "__main__":
    main()
