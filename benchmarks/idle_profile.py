"""Where an idle connection's memory goes: one worker holding N idle event streams, measured by
tracemalloc inside the worker and grouped by who allocated it.

    python -m benchmarks.idle_profile [--clients 2000]

Prints KB per connection for each group, the largest lines, and the worker's RSS growth per
connection (tracemalloc's own overhead included). Loopback only; the server stops at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx

from benchmarks.common import OUT, PY, ROOT, Server, free_port, raise_fd_limit

#: Who allocated a line's memory, by the path of its file.
GROUPS = (
    ("gunicorn/", "gunicorn (request, parser, environ, response)"),
    ("gevent/", "gevent (greenlet, socket, timeouts)"),
    ("flask/", "Flask and Werkzeug (request context, routing)"),
    ("werkzeug/", "Flask and Werkzeug (request context, routing)"),
    ("sse_blueprint/", "sse_blueprint (subscription, response generator, closures)"),
)
#: The wait in which an idle reader's greenlet sleeps. What tracemalloc finds allocated at that
#: line is, by all signs, the copy of the greenlet's C stack that greenlet keeps while it is
#: switched out (its size follows how deep the C stack was at the switch).
PARK = ("sse_blueprint/engine/fanout.py", "wait(")


def traced_server() -> Server:
    port = free_port()
    env = {
        "FLASK_SSE_DATABASE_URL": f"sqlite:///{OUT}/idle-{uuid.uuid4().hex[:8]}.sqlite3",
        "PYTHONTRACEMALLOC": "1",
    }
    cmd = [
        PY, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
        "--workers", "1", "--worker-connections", "20000", "benchmarks.apps.ours_traced:app",
    ]  # fmt: skip
    return Server("ours-traced", cmd, port, env)


def group_of(line: dict[str, Any]) -> str:
    path = line["file"]
    if path.endswith(PARK[0]) and PARK[1] in source_line(path, line["line"]):
        return "the idle greenlet's saved C stack (at its wait)"
    for marker, name in GROUPS:
        if marker in path:
            return name
    return "other"


def source_line(path: str, number: int) -> str:
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if n == number:
                return text
    return ""


def profile(clients: int) -> dict[str, Any]:
    server = traced_server()
    try:
        client = httpx.Client(base_url=server.url, timeout=120)
        stream_url = client.post("/api/streams", json={"producer": "idle"}).json()["stream_url"]
        status_url = stream_url + "/status"
        time.sleep(1)
        client.get("/_mem/mark")
        rss_before = server.rss_kb()
        proc = subprocess.Popen(
            [PY, "-m", "benchmarks.loadclient", server.url + stream_url, "--clients",
             str(clients), "--idle", "--connect-rate", "1000"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=raise_fd_limit,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while client.get(status_url).json()["subscribers"] < clients:
                if time.monotonic() > deadline:
                    raise RuntimeError("the clients did not all connect in time")
                time.sleep(0.5)
            time.sleep(1)
            rss_after = server.rss_kb()
            lines = client.get("/_mem/diff").json()["lines"]
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    finally:
        server.stop()
    groups: dict[str, float] = defaultdict(float)
    for line in lines:
        groups[group_of(line)] += line["bytes"]
    top = sorted(lines, key=lambda line: -line["bytes"])[:15]
    return {
        "clients": clients,
        "rss_kb_per_connection": (rss_after - rss_before) / clients,
        "traced_kb_per_connection": sum(groups.values()) / clients / 1024,
        "groups_kb_per_connection": {
            name: round(size / clients / 1024, 2)
            for name, size in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_lines": [shown(line, clients) for line in top],
    }


def shown(line: dict[str, Any], clients: int) -> dict[str, Any]:
    path = line["file"].split("site-packages/")[-1].replace(str(ROOT) + "/", "")
    return {**line, "file": path, "bytes_per_connection": round(line["bytes"] / clients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=2000)
    result = profile(parser.parse_args().clients)
    print(json.dumps(result, indent=2))
    (OUT / "idle_profile.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
