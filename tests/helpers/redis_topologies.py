"""Throw-away Redis topologies on loopback for the tests, and the readers that cross them.

:class:`LocalCluster`: primaries with replicas (kill one, migrate a slot, cut a replica's link);
:class:`LocalSentinel`: a primary, a replica and a Sentinel that promotes it. Started with
Debian's ``redis-server`` (7.0: sharded Pub/Sub) and ``redis-cli --cluster create``, with a node
timeout / down-after of one second, so that a replica takes over a killed primary in a few
seconds. :func:`follow` reads a stream as an EventSource does across instances and failovers.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
import types
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import httpx
import redis
from redis.cluster import RedisCluster

from sse_blueprint.backends.redis.connection import RedisConnection
from tests.conftest import (
    LiveServer,
    PostgresServer,
    janitor,
    read_stream,
    start_stream,
    wait_for_redis,
)
from tests.helpers.sse_parser import Transcript

#: The turn the tests stream: paragraphs (so blocks end and are persisted as it goes).
TEXT = "".join(f"Part {i}: " + "shards and slots " * 4 + "\n\n" for i in range(8)) + "End."

__all__ = [
    "TEXT",
    "LocalCluster",
    "LocalSentinel",
    "assert_exact",
    "cut_replication",
    "demo",
    "follow",
    "instances",
    "mend_replication",
    "readers",
]


def _cluster_ports(n: int) -> list[int]:
    """``n`` free loopback ports below 55536 whose cluster bus ports (10000 above) are free too,
    and none of them another's bus port (a node on 44663 would find 34663's bus there)."""
    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < n:
        port = random.randint(20000, 45000)
        if {port, port + 10000} & taken:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", p))
            except OSError:
                continue
        ports.append(port)
        taken |= {port, port + 10000}
    return ports


def _start_redis(port: int, where: Path, *args: str) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on ``port`` (durable, its files in ``where``), once it listens."""
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "redis.log", "ab") as log:
        proc = subprocess.Popen(
            [
                "redis-server", *args, "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(where), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--protected-mode", "no", "--repl-diskless-sync-delay", "0",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    janitor.started("pid", proc.pid)
    wait_for_redis(proc, port, where / "redis.log")
    return proc


def cut_replication(replica: Any) -> None:
    """The replica ``replica`` (a client of it) stops getting its primary's writes, still a
    healthy node: its link is cut and its handshake fails (it sends a password that its
    primary does not have) until its ``masterauth`` is set back to ``""``."""
    replica.config_set("masterauth", "not-the-password")
    replica.execute_command("CLIENT", "KILL", "TYPE", "master")


def mend_replication(replica: Any) -> None:
    replica.config_set("masterauth", "")


class _Servers:
    """Redis servers of one test, by port, and their files; ``start`` returns ``self``."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        janitor.started("dir", self.dir)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> Self:
        raise NotImplementedError

    def node(self, port: int) -> Any:  # (redis-py's commands are untyped)
        return redis.Redis(port=port, socket_timeout=5)

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port``."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()
        janitor.stopped("pid", proc.pid)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
        janitor.stopped("dir", self.dir)


class LocalCluster(_Servers):
    """``primaries`` primaries with ``replicas`` replicas each, on free loopback ports."""

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        super().__init__("sse-cluster-")
        self.primaries, self.replicas = primaries, replicas
        self.ports = _cluster_ports(primaries * (1 + replicas))

    @property
    def url(self) -> str:
        """``SSE_REDIS_URL`` for it: two seed nodes (either finds the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start_node(self, port: int) -> None:
        self.procs[port] = _start_redis(
            port, self.dir / str(port),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
        )  # fmt: skip

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.start_node(port)
        made = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}")
        self.wait_healthy()
        return self

    def info(self) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` as the first live node sees it."""
        for port in self.ports:
            if port in self.procs:
                with contextlib.suppress(redis.RedisError):
                    nodes: dict[str, Any] = self.node(port).cluster("nodes")
                    return [{"address": a, **v} for a, v in nodes.items()]
        raise RuntimeError("no live node")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is ok and every slot has a live primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, RuntimeError):
                states = [self.node(p).cluster("info")["cluster_state"] for p in self.procs]
                live = {f"127.0.0.1:{p}" for p in self.procs}
                primaries = [
                    n for n in self.info()
                    if "master" in n["flags"] and n["address"].split("@")[0] in live
                ]  # fmt: skip
                covered = sum(  # (a range, or one slot)
                    int(slots[-1]) - int(slots[0]) + 1
                    for n in primaries for slots in n["slots"]
                )  # fmt: skip
                replicas = [
                    self.node(p).info("replication") for p in self.procs
                ]  # a replica that never synced with its primary cannot take over from it
                synced = all(
                    r.get("master_link_status") == "up" for r in replicas if r["role"] == "slave"
                )
                settled = all(s == "ok" for s in states) and covered == 16384 and synced
                if settled and all(self._whole(p, live) for p in self.procs):
                    return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become healthy")

    def _whole(self, port: int, live: set[str]) -> bool:
        """Whether the node on ``port`` sees the cluster as it was made: no node it flags as
        failing among the live ones, and, when every node is up, every primary with slots with
        its ``replicas`` replicas (a node back from a kill is flagged ``fail`` by the others for
        a moment after it has synced)."""
        nodes: dict[str, Any] = self.node(port).cluster("nodes")
        seen = [
            {"address": a.split("@")[0], **v} for a, v in nodes.items()
            if a.split("@")[0] in live
        ]  # fmt: skip
        if any("fail" in n["flags"] for n in seen):  # (also "fail?")
            return False
        if len(self.procs) < len(self.ports):
            return True
        ids = {n["node_id"] for n in seen if "master" in n["flags"] and n["slots"]}
        return all(sum(1 for n in seen if n["master_id"] == i) >= self.replicas for i in ids)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=next(iter(self.procs)))  # a live node

    def port_of(self, key: str) -> int:
        """The port of the primary that owns ``key``'s slot now."""
        client: Any = self.client()
        try:
            client.nodes_manager.initialize()
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def replica_of(self, port: int) -> int:
        """The port of a replica of the primary on ``port``."""
        primary_id = self.node(port).cluster("myid")
        primary_id = primary_id.decode() if isinstance(primary_id, bytes) else primary_id
        for node in self.info():
            if node["master_id"] == primary_id and "fail" not in node["flags"]:
                return int(node["address"].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"the primary on {port} has no replica")

    def migrate_slot(self, slot: int, source: int, target: int) -> int:
        """Move ``slot`` from the primary on ``source`` to the one on ``target`` while clients
        write to it, as ``redis-cli --cluster reshard`` does: importing/migrating, ``MIGRATE``
        its keys, then the new owner everywhere. Returns how many keys moved."""
        src, dst = self.node(source), self.node(target)
        src_id, dst_id = src.cluster("myid"), dst.cluster("myid")
        src_id = src_id.decode() if isinstance(src_id, bytes) else src_id
        dst_id = dst_id.decode() if isinstance(dst_id, bytes) else dst_id
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):  # one by one
            src.execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
            moved += len(keys)
            time.sleep(0.2)  # writes go on meanwhile: some keys here, some there (ASK, TRYAGAIN)
        others = [p for p in self.procs if p not in (source, target)]
        for port in [target, source, *others]:
            node = self.node(port)
            if node.info("replication")["role"] == "master":  # (replicas learn it from them)
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved


class LocalSentinel(_Servers):
    """A primary, a replica and one Sentinel (quorum 1) that promotes the replica when the
    primary is down for a second; ``url``: ``SSE_REDIS_URL`` for it."""

    service = "sse"

    def __init__(self) -> None:
        super().__init__("sse-sentinel-")
        self.primary, self.replica, self.sentinel = _cluster_ports(3)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.service}"

    def start(self) -> LocalSentinel:
        self.procs[self.primary] = _start_redis(self.primary, self.dir / "a")
        self.procs[self.replica] = _start_redis(
            self.replica, self.dir / "b", "--replicaof", "127.0.0.1", str(self.primary)
        )
        (self.dir / "s").mkdir()
        conf = self.dir / "s" / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {self.dir / 's'}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 3000\n"
        )
        with open(self.dir / "s" / "sentinel.log", "ab") as log:
            proc = subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        janitor.started("pid", proc.pid)
        self.procs[self.sentinel] = proc
        self.wait_primary(self.primary)
        return self

    def primary_now(self) -> int | None:
        """The port of the primary the Sentinel names now."""
        with contextlib.suppress(redis.RedisError):
            address = self.node(self.sentinel).sentinel_get_master_addr_by_name(self.service)
            return int(address[1]) if address else None
        return None

    def wait_primary(self, port: int, timeout: float = 30) -> None:
        """Until the Sentinel names ``port`` the primary, and every live replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if (
                    self.primary_now() == port
                    and self.node(port).info("replication")["role"] == "master"
                ):
                    replicas = [p for p in (self.primary, self.replica) if p != port]
                    if all(
                        self.node(r).info("replication").get("master_link_status") == "up"
                        for r in replicas if r in self.procs
                    ):  # fmt: skip
                        return
            time.sleep(0.1)
        raise RuntimeError(f"the Sentinel did not name {port} the primary in time")


@contextlib.contextmanager
def instances(
    server_factory: Any, postgres: PostgresServer, redis_url: str, *, lease: float
) -> Iterator[types.SimpleNamespace]:
    """Two gunicorn instances (``a``, ``b``) of two workers on ``redis_url`` and a new database
    of ``postgres``; ``instance(extra_config)`` starts more. All are stopped at the end."""
    name = "t_" + uuid.uuid4().hex[:12]
    postgres.psql(f"CREATE DATABASE {name}")
    config = {
        "SSE_REDIS_URL": redis_url,
        "SSE_DATABASE_URL": postgres.url.rsplit("/", 1)[0] + f"/{name}",
        "SSE_REDIS_LEASE": lease,
        "SSE_HEARTBEAT_INTERVAL": 1,
        "SSE_RETRY_MS": 200,
    }
    started: list[LiveServer] = []

    def instance(extra: dict[str, Any] | None = None) -> LiveServer:
        server: LiveServer = server_factory(
            {**config, **(extra or {})}, app="tests.helpers.live_app:app", workers=2
        )
        started.append(server)
        return server

    try:
        yield types.SimpleNamespace(a=instance(), b=instance(), instance=instance)
    finally:
        for server in started:
            server.stop()


def demo(base: str, text: str = TEXT, chunk: int = 3, interval: int = 10) -> str:
    return start_stream(base, "demo", text=text, chunk_size=chunk, interval_ms=interval)


def follow(bases: list[str], stream_id: str, seed: int) -> Transcript:
    """A reader that hangs up after a few events and resumes from its last id on the next
    instance, as an EventSource does; through a failover it retries what the server could not
    answer yet (503) or a connection the server cut."""
    rng = random.Random(seed)
    client = Transcript()
    hops = 0
    deadline = time.monotonic() + 120
    while client.terminal is None and time.monotonic() < deadline:
        base = bases[hops % len(bases)]
        hops += 1
        try:
            result = read_stream(
                base, stream_id, client.last_id or None, stop_after=rng.randint(3, 40),
                tolerate_cuts=True, timeout=20,
            )  # fmt: skip
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        if result.status == 503:
            time.sleep(0.2)
            continue
        assert result.status == 200, result.raw[:300]
        for event in result.events:
            client.apply(event.id, event.type, event.json())
    return client


def readers(pool: ThreadPoolExecutor, env: Any, stream_ids: list[str]) -> list[Future[Transcript]]:
    """A resuming reader per id, alternating the instance each starts on."""
    bases = [env.a.url, env.b.url]
    return [
        pool.submit(follow, bases[n % 2 :] + bases[: n % 2], sid, n)
        for n, sid in enumerate(stream_ids)
    ]


def assert_exact(client: Transcript, text: str = TEXT) -> None:
    assert client.terminal == "done"
    assert client.text() == text
    assert len(client.delta_ids) == len(set(client.delta_ids))  # nothing twice


def callers_wait_for_a_connection(url: str, callers: int) -> None:
    """More callers at once than a pool holds (16) each wait for a connection: none fails with
    "Too many connections" (every call is a BLPOP of one second on a key of one slot)."""
    conn = RedisConnection(url, patience=5)
    try:
        with ThreadPoolExecutor(callers) as pool:
            calls = [
                pool.submit(conn.redis.blpop, [f"{{sse-test}}:{n}"], 1) for n in range(callers)
            ]
            assert [call.result(timeout=30) for call in calls] == [None] * callers
    finally:
        conn.redis.close()
