"""A Redis kept busy by another client's endless script, for the tests of how we wait for it.

Importable both by pytest and by the gevent-patched helper scripts (it uses only threads and
sleeps, which gevent patches).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import redis


@contextlib.contextmanager
def busy_redis(url: str) -> Iterator[None]:
    """While inside, Redis answers ``BUSY`` to every other client's command (scripts are let
    run 100 ms before that starts); on leaving, the script is killed and Redis answers again."""
    admin = redis.Redis.from_url(url)
    admin.config_set("busy-reply-threshold", 100)

    def run_for_ever() -> None:
        with contextlib.suppress(redis.ResponseError):  # killed
            redis.Redis.from_url(url).eval("while true do end", 0)

    endless = threading.Thread(target=run_for_ever)
    endless.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until Redis says it is busy
            try:
                admin.ping()
            except redis.ResponseError:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("Redis never became busy")
        yield
    finally:
        admin.script_kill()
        endless.join(10)
        admin.config_set("busy-reply-threshold", 5000)
