"""Run by the test session as ``python -m tests.helpers.janitor``: it stops what the session
left running.

A test that hangs past pytest-timeout's limit ends pytest with ``os._exit``: no fixture's teardown
runs, and gunicorn, redis-server and PostgreSQL would outlive the run. The session tells this
process, in its own session (a Ctrl-C does not reach it), what it starts and stops, one line each
on stdin: ``+ KIND VALUE`` or ``- KIND VALUE``. When stdin ends, however pytest ended, whatever is
still started is stopped:

- ``group PGID``: a process group (a gunicorn master and its workers), killed;
- ``pid PID``: one process, killed;
- ``pgdata DIR``: a PostgreSQL cluster, stopped at once with ``pg_ctl``;
- ``dir PATH``: a temporary directory, removed (after the processes above are gone).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys

ORDER = ("group", "pid", "pgdata", "dir")


def pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` (initdb, pg_ctl)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is missing: run `make test` (it installs it)")
    return found[-1]


def as_postgres(*command: str) -> list[str]:
    """``command`` run as the user postgres when we are root (PostgreSQL refuses to run as root)."""
    return [*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []), *command]


def cleanup(kind: str, value: str) -> None:
    if kind == "group":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(value), signal.SIGKILL)
    elif kind == "pid":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(value), signal.SIGKILL)
    elif kind == "pgdata":
        command = as_postgres(pg_bin("pg_ctl"), "-D", value, "-m", "immediate", "-w", "stop")
        subprocess.run(command, capture_output=True, timeout=60, check=False)
    elif kind == "dir":
        shutil.rmtree(value, ignore_errors=True)


def main() -> None:
    started: dict[tuple[str, str], None] = {}  # in the order they were started
    for line in sys.stdin:
        sign, kind, value = line.rstrip("\n").split(" ", 2)
        if sign == "+":
            started[(kind, value)] = None
        else:
            started.pop((kind, value), None)
    for order in ORDER:
        for kind, value in started:
            if kind == order:
                print(
                    f"janitor: the test session left {kind} {value}; stopping it", file=sys.stderr
                )
                cleanup(kind, value)


if __name__ == "__main__":
    main()
