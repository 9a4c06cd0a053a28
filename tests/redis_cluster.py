"""A throw-away Redis Cluster on loopback for the tests: primaries, replicas, kill, migrate.

Started with Debian's ``redis-server`` (7.0: sharded Pub/Sub) and ``redis-cli --cluster create``;
a node timeout of one second, so that a replica takes over a killed primary in a few seconds.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from tests.conftest import janitor

__all__ = ["LocalCluster"]


def _cluster_port() -> int:
    """A free loopback port below 55536 whose bus port (10000 above) is free too."""
    while True:
        port = random.randint(20000, 45000)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", p))
            except OSError:
                continue
        return port


class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, on free loopback ports."""

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sse-cluster-"))
        janitor.started("dir", self.dir)
        self.primaries, self.replicas = primaries, replicas
        self.ports = [_cluster_port() for _ in range(primaries * (1 + replicas))]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``SSE_REDIS_URL`` for it: two seed nodes (either finds the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start_node(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        with open(node_dir / "redis.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", str(node_dir), "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                    "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                    "--protected-mode", "no", "--repl-diskless-sync-delay", "0",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        janitor.started("pid", proc.pid)
        self.procs[port] = proc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {port} did not start")

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_healthy()
        return self

    def node(self, port: int) -> Any:  # (redis-py's commands are untyped)
        return redis.Redis(port=port, socket_timeout=5)

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
                if all(s == "ok" for s in states) and covered == 16384 and synced:
                    return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become healthy")

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

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()
        janitor.stopped("pid", proc.pid)

    def replica_of(self, port: int) -> int:
        """The port of a replica of the primary on ``port``."""
        primary_id = self.node(port).cluster("myid")
        primary_id = primary_id.decode() if isinstance(primary_id, bytes) else primary_id
        for node in self.info():
            if node["master_id"] == primary_id and "fail" not in node["flags"]:
                return int(node["address"].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"the primary on {port} has no replica")

    def cut_replication(self, replica: int) -> None:
        """The replica on ``replica`` stops getting its primary's writes, still a healthy node
        of the cluster: its link is cut and its handshake fails (it sends a password that
        its primary does not have) until :meth:`mend_replication`."""
        node = self.node(replica)
        node.config_set("masterauth", "not-the-password")
        node.execute_command("CLIENT", "KILL", "TYPE", "master")

    def mend_replication(self, replica: int) -> None:
        self.node(replica).config_set("masterauth", "")

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

    def remove(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
        janitor.stopped("dir", self.dir)
