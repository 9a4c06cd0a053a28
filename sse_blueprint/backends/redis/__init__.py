"""The Redis backend (``SSE_REDIS_URL``): streams shared across workers and instances.

    backend     RedisBackend: the port the engine and the web layer call (ends, status, active)
    owners      the owner's side: claims and fencing, batched appends, lease renewals
    scripts     keys, channels and the Lua scripts
    connection  the topology by URL (one Redis, Cluster, Sentinel), the pools, and the one
                rule for retrying what Redis did not run
    pubsub      the worker's Pub/Sub: one lane (connection) per Redis, or per cluster primary
    mirrors     followers of streams that other workers run, and their watchdog
    clients     open responses per client address, across the deployment

Imports the engine and redis; the engine knows this only through its ports.
"""

from __future__ import annotations

from .backend import LOST_IN_REDIS, RedisBackend
from .connection import is_transient

__all__ = ["LOST_IN_REDIS", "RedisBackend", "is_transient"]
