"""What every benchmark server and the load client share: the event, and process helpers."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "benchmarks" / "results"))


def tick(n: int, pad: str) -> dict[str, Any]:
    """The payload every server sends: producer timestamp, sequence number, padding."""
    return {"t": time.time(), "n": n, "pad": pad}


def pause(began: float, n: int, interval: float) -> float:
    """Seconds to sleep after event ``n`` to keep an exact rate (0 for a burst: just yield)."""
    if interval <= 0:
        return 0.0
    return max(0.0, began + (n + 1) * interval - time.monotonic())


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Server:
    """A server process on 127.0.0.1:port; stopped (its whole group) by :meth:`stop`."""

    def __init__(self, name: str, cmd: Sequence[str], port: int, env: Mapping[str, str]) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        OUT.mkdir(parents=True, exist_ok=True)
        self.log = open(OUT / f"server-{name}.log", "ab")  # noqa: SIM115
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            list(cmd), cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=raise_fd_limit,
        )  # fmt: skip
        self._wait_up()

    def _wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                time.sleep(0.3)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not come up")

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid) or [self.proc.pid]

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.worker_pids())

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


PY = sys.executable
