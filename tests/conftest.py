"""Fixtures: a real gunicorn (gevent worker) on a loopback port, and HTTP helpers.

The listening socket is made here and handed to gunicorn (``--bind fd://N``), so there is no race
for a free port. Every server runs with ``GEVENT_MONITOR_THREAD_ENABLE=1`` and its log is checked
when it stops: a traceback, or a gevent blocking report that points into our code, fails the run.
(The pytest process itself is not monitored: it is not a gevent server and blocks as it likes.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, sync_playwright

from tests.helpers.janitor import as_postgres, pg_bin
from tests.helpers.sse_parser import ParsedEvent, SSEParser, Transcript

ROOT = Path(__file__).resolve().parent.parent
#: The app most integration tests serve (tests/helpers/live_app.py).
LIVE_APP = "tests.helpers.live_app:app"

DEMO_TEXT = (
    "Streams outlive requests. A producer writes on its own greenlet,\n"
    "and every reader follows the same buffer.\n\n"
    "Reconnect with Last-Event-ID and you catch up exactly: no gap, no duplicate.\n\n"
    "Unicode too: héllo wörld — 你好, мир, 🙂🚀.\n\n\n"
    "  Leading spaces, a trailing one \n"
    "and a last line without newline"
)


#: What makes the reference app's chat call a real model (see models/assistant.py).
MODEL_SETTINGS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                  "CHAT_MODEL")  # fmt: skip


class Janitor:
    """Tells :mod:`tests.helpers.janitor`, a process of its own, what this session starts and
    stops: if pytest ends without its teardowns (a hung test's timeout calls ``os._exit``), it
    stops what is left. It ends when this process does, however it does."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._proc = self._proc or subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.janitor"],
                cwd=ROOT, stdin=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip

    def _tell(self, line: str) -> None:
        self.start()
        with self._lock:
            assert self._proc is not None
            assert self._proc.stdin is not None
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()

    def started(self, kind: str, value: object) -> None:
        self._tell(f"+ {kind} {value}")

    def stopped(self, kind: str, value: object) -> None:
        self._tell(f"- {kind} {value}")


janitor = Janitor()


def pytest_configure(config: pytest.Config) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        janitor.start()  # with the session's own stderr, not a test's captured one


class LiveServer:
    """gunicorn serving ``app`` with ``config`` (as ``FLASK_*`` environment variables)."""

    def __init__(
        self,
        log_path: Path,
        config: Mapping[str, Any] | None = None,
        *,
        app: str = "app:app",
        workers: int = 1,
        port: int = 0,
        env: Mapping[str, str] | None = None,
        ready: tuple[str, int] = ("/", 200),
    ) -> None:
        self.log_path = log_path
        self.env = dict(env or {})
        self.ready = ready  # the path that answers, and how, once the app is up
        self.config = dict(config or {})
        # Each server gets its own database unless the test shares one on purpose.
        self.config.setdefault("SSE_DATABASE_URL", f"sqlite:///{log_path.parent / 'sse.sqlite3'}")
        self.app = app
        self.workers = workers
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(2048)
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        for key in MODEL_SETTINGS:  # a developer's own keys must not turn the stand-in real
            env.pop(key, None)
        env.update(self.env)
        env["GEVENT_MONITOR_THREAD_ENABLE"] = "1"
        # gevent reports a greenlet that runs 0.1 s without yielding. On this 2-core machine a
        # worker can go unscheduled that long while the test process itself parses megabytes;
        # 0.3 s keeps such hiccups out and still catches real blocking calls (an unpatched
        # sleep, a synchronous driver waiting on a dead database), which last far longer.
        env["GEVENT_MAX_BLOCKING_TIME"] = "0.3"
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in self.config.items():
            env[f"FLASK_{key}"] = value if isinstance(value, str) else json.dumps(value)
        cmd = [
            sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
            "--bind", f"fd://{sock.fileno()}", "--workers", str(self.workers), self.app,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=[sock.fileno()], start_new_session=True,
            )  # fmt: skip
        janitor.started("group", self.proc.pid)
        sock.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                path, status = self.ready
                if httpx.get(self.url + path, timeout=2).status_code == status:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not come up:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        janitor.stopped("group", self.proc.pid)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def problems(self) -> list[str]:
        """Tracebacks and gevent blocking reports in the log that involve our code."""
        text = self.log()
        found = []
        for match in re.finditer(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", text):
            if "deliberate test failure" not in match.group():
                found.append(match.group())
        for line in text.splitlines():  # SSE_LOG_FORMAT = json
            if '"exception": "Traceback' in line and "deliberate test failure" not in line:
                found.append(line)
        for report in re.split(r"\n(?==+\n)", text):
            # (Importing the app while a worker boots, and the gc.collect() of our
            # post_worker_init hook, take CPU before anything is served; that is not the event
            # loop blocked at work, so it is not reported. A loaded machine stretches both.)
            # Only the blocked stack counts (the greenlet listing after it names every spawner).
            blocked = report.partition("Blocked Stack")[2].partition("\nInfo:")[0]
            if (
                "appears to be blocked" in report
                and re.search(r"sse_blueprint/|/app\.py|tests/|models/", blocked)
                and "in load_wsgi" not in blocked
                and "in post_worker_init" not in blocked
            ):
                found.append(report)
        return found


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start servers with custom config; all are stopped and their logs checked at the end."""
    servers: list[LiveServer] = []

    def make(config: Mapping[str, Any] | None = None, **kwargs: Any) -> LiveServer:
        log_path = tmp_path_factory.mktemp("gunicorn") / "server.log"
        server = LiveServer(log_path, config, **kwargs)
        servers.append(server)
        return server.start()

    yield make
    problems = []
    for server in servers:
        server.stop()
        problems += server.problems()
    assert not problems, "server log shows problems:\n\n" + "\n\n".join(problems)


@pytest.fixture(scope="session")
def server(server_factory: Any) -> LiveServer:
    """The reference app plus test producers, heartbeat 0.5 s, a small client queue."""
    server: LiveServer = server_factory(
        {
            "SSE_HEARTBEAT_INTERVAL": 0.5,
            "SSE_CLIENT_QUEUE": 32,
            "SSE_RETRY_MS": 1500,
            "SSE_WRITE_TIMEOUT": 2,
        },
        app=LIVE_APP,
    )
    return server


CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (one for the session)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Any]:
    """A model provider on loopback (:mod:`tests.helpers.upstream`), one per test module."""
    from tests.helpers.upstream import Upstream

    server = Upstream()
    yield server
    server.close()


def npm_folder(home: Path, *packages: str, files: tuple[Path, ...] = ()) -> Path:
    """``home`` made an npm project with ``packages`` installed and ``files`` copied in."""
    npm = shutil.which("npm")
    assert npm, "npm is missing (make test installs Debian's nodejs and npm)"
    subprocess.run([npm, "init", "-y"], cwd=home, check=True, capture_output=True, timeout=60)
    subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "--engine-strict=false",
         *packages],
        cwd=home, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for file in files:
        shutil.copy(file, home / file.name)
    return home


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that must bind it themselves)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def cancel_reaches_every_reader(
    cancel_base: str, stream_id: str, reader_bases: list[str], after: float
) -> list[ReadResult]:
    """Readers follow the stream; after ``after`` s it is cancelled through ``cancel_base``."""
    with ThreadPoolExecutor(len(reader_bases)) as pool:
        readers = [pool.submit(read_stream, base, stream_id) for base in reader_bases]
        time.sleep(after)
        response = httpx.post(f"{cancel_base}/api/streams/{stream_id}/cancel", json={})
        assert response.status_code == 202
        assert response.json()["state"] == "cancelled"
        results = [reader.result(timeout=20) for reader in readers]
    for result in results:
        assert result.events[-1].type == "cancelled"
        assert result.transcript.terminal == "cancelled"
    return results


# -- PostgreSQL ----------------------------------------------------------------------------------


class PostgresServer:
    """A throw-away PostgreSQL cluster on a loopback port (as user postgres when run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sse-pg-"))
        janitor.started("dir", self.dir)
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run(as_postgres(*cmd), check=True, capture_output=True, timeout=60)

    def init(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )
        return self.start()

    def start(self) -> PostgresServer:
        # Every gunicorn worker of every test server holds a small pool: more than the default
        # 100 connections when several multi-worker servers are up at once.
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=400"
        )
        log = str(self.dir / "postgres.log")
        janitor.started("pgdata", self.data)
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        janitor.stopped("pgdata", self.data)

    def psql(self, sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", sql],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        janitor.stopped("dir", self.dir)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init()
    try:
        yield server
    finally:
        server.remove()


# -- Redis -----------------------------------------------------------------------------------------


def wait_for_redis(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the redis-server ``proc`` answers ``PING`` on ``port``: its own answer, not just
    something listening there (another node's cluster bus, a process that took the port while
    this one was down). Raises with the tail of its ``log`` if it exits or takes 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as r:
            if r.ping():
                return
        time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server on {port} did not start:\n{tail}")


class RedisServer:
    """A throw-away redis-server on a loopback port, with an append-only file (fsync always);
    with ``persistent=False``, none: a restart comes back empty, as a Redis that lost its data."""

    def __init__(self, *, persistent: bool = True) -> None:
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="sse-redis-"))
        janitor.started("dir", self.dir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.dir), "--appendonly", "yes" if self.persistent else "no",
                    "--appendfsync", "always",
                    "--save", "", "--protected-mode", "no",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        janitor.started("pid", self.proc.pid)
        wait_for_redis(self.proc, self.port, self.dir / "redis.log")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: redis finishes its append-only file and exits
            self.proc.wait(timeout=20)
            janitor.stopped("pid", self.proc.pid)
            self.proc = None

    def restart(self, down_for: float = 0.5) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def remove(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            janitor.stopped("pid", self.proc.pid)
        shutil.rmtree(self.dir, ignore_errors=True)
        janitor.stopped("dir", self.dir)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.remove()


# -- a loopback proxy that cuts connections ------------------------------------------------------


class CuttingProxy:
    """A loopback TCP proxy that cuts connections after a random number of response bytes.

    With ``only`` set, a connection is cut only once it carries a request whose line starts with
    those bytes (keep-alive connections carry several), counted from that request on. With
    ``in_body``, the count starts after the response headers: a browser that gets half a header
    block takes it as the whole one, and an EventSource whose ``Content-Type`` was cut short
    gives up for good (the spec's "fail the connection"), which is not what these tests test.
    """

    def __init__(
        self,
        upstream: str,
        seed: int,
        max_bytes: int = 3000,
        only: bytes | None = None,
        *,
        in_body: bool = False,
    ) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.rng = random.Random(seed)
        self.max_bytes = max_bytes
        self.only = only
        self.in_body = in_body
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self.upstream)
            armed = {"limit": None if self.only else self.rng.randint(1, self.max_bytes)}
            threading.Thread(
                target=self._pump, args=(client, upstream, armed, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, armed, False), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, armed: dict[str, Any], up: bool
    ) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    if self.only and armed["limit"] is None and b"\n" + self.only in b"\n" + data:
                        armed["limit"] = self.rng.randint(1, self.max_bytes)
                        armed["from"] = True
                    dst.sendall(data)
                    continue
                limit = armed["limit"]
                if armed.pop("from", False):
                    sent = 0
                    armed["head"] = self.in_body
                if armed.get("head"):
                    end = data.find(b"\r\n\r\n")
                    if end < 0:
                        dst.sendall(data)
                        continue
                    armed["head"] = False
                    dst.sendall(data[: end + 4])
                    data = data[end + 4 :]
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()


# -- HTTP helpers ------------------------------------------------------------------------------


def start_stream(base: str, producer: str = "demo", **input: Any) -> str:
    response = httpx.post(f"{base}/api/streams", json={"producer": producer, "input": input})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["stream_url"] == f"/api/streams/{body['stream_id']}"
    stream_id: str = body["stream_id"]
    return stream_id


def start_demo(base: str, text: str = DEMO_TEXT, chunk_size: int = 7, interval_ms: int = 5) -> str:
    return start_stream(base, "demo", text=text, chunk_size=chunk_size, interval_ms=interval_ms)


@dataclasses.dataclass
class ReadResult:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[ParsedEvent]
    parser: SSEParser
    transcript: Transcript


def read_stream(
    base: str,
    stream_id: str,
    last_event_id: int | str | None = None,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    stop_after: int | None = None,
    timeout: float = 30,
    tolerate_cuts: bool = False,
) -> ReadResult:
    """Read a stream as SSE until the server ends it (or ``stop_after`` events, then hang up).

    With ``tolerate_cuts``, a connection the server cuts (a reader that lagged more than
    ``SSE_CLIENT_QUEUE`` events, which a loaded machine makes of any reader) ends the read with
    what had arrived, as it ends an EventSource's connection; the caller resumes from there."""
    hdrs = dict(headers or {})
    if last_event_id is not None:
        hdrs["Last-Event-ID"] = str(last_event_id)
    parser = SSEParser()
    transcript = Transcript()
    events: list[ParsedEvent] = []
    raw = b""
    url = f"{base}/api/streams/{stream_id}"
    status, got_headers = 0, httpx.Headers()
    try:
        with httpx.stream("GET", url, params=params, headers=hdrs, timeout=timeout) as response:
            status, got_headers = response.status_code, response.headers
            for chunk in response.iter_raw():
                raw += chunk
                for event in parser.feed(chunk):
                    events.append(event)
                    transcript.apply(event.id, event.type, event.json())
                    if stop_after is not None and len(events) >= stop_after:
                        return ReadResult(status, got_headers, raw, events, parser, transcript)
            events += parser.feed(b"", final=True)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        if not tolerate_cuts:
            raise
    return ReadResult(status, got_headers, raw, events, parser, transcript)


def read_ndjson(base: str, stream_id: str, **kwargs: Any) -> tuple[httpx.Response, list[Any]]:
    response = httpx.get(f"{base}/api/streams/{stream_id}", timeout=30, **kwargs)
    lines = response.text.split("\n")
    return response, [json.loads(line) for line in lines if line.strip()]


def wait_done(base: str, stream_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(f"{base}/api/streams/{stream_id}/status").json()
        if status["state"] != "running":
            return status
        time.sleep(0.05)
    raise AssertionError(f"stream {stream_id} still running after {timeout}s")
