"""Configuration: the ``SSE_*`` keys of a Flask app's config, checked once at start-up."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigError", "SSEConfig"]


class ConfigError(ValueError):
    """An ``SSE_*`` config value is missing its mark; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class SSEConfig:
    """The settings the extension reads. See the README's config table for each key."""

    database_url: str | None = None
    redis_url: str | None = None
    heartbeat_interval: float = 15.0
    retry_ms: int = 2000
    buffer_size: int = 1024
    client_queue: int = 2048
    stream_timeout: float = 600.0
    retention: float = 300.0
    cors_origins: tuple[str, ...] = ()
    max_streams: int = 1000
    max_request_bytes: int = 1 << 20
    create_tables: bool = True
    redis_lease: float = 10.0
    max_clients_per_stream: int = 10_000
    max_clients_per_address: int = 256
    max_event_bytes: int = 1 << 20
    shutdown_timeout: float = 10.0
    write_timeout: float = 30.0
    metrics: bool = False
    log_format: str = ""
    direct_writes: bool = True
    hold_idle: bool = True
    body_timeout: float = 10.0
    max_streams_per_address: int = 100
    delivery: str = "live"
    max_durable_events: int = 1000
    max_meta_bytes: int = 65536
    gc_thresholds: tuple[int, int, int] | None = (50_000, 50, 10)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> SSEConfig:
        """Read ``SSE_*`` keys from a Flask config (values may be strings from the environment)."""
        d = cls()
        return cls(
            database_url=_optional_str(config, "SSE_DATABASE_URL"),
            redis_url=_optional_str(config, "SSE_REDIS_URL"),
            heartbeat_interval=_number(config, "SSE_HEARTBEAT_INTERVAL", d.heartbeat_interval),
            retry_ms=_integer(config, "SSE_RETRY_MS", d.retry_ms, minimum=0),
            buffer_size=_integer(config, "SSE_BUFFER_SIZE", d.buffer_size, minimum=1),
            client_queue=_integer(config, "SSE_CLIENT_QUEUE", d.client_queue, minimum=1),
            stream_timeout=_number(config, "SSE_STREAM_TIMEOUT", d.stream_timeout),
            retention=_number(config, "SSE_RETENTION", d.retention, allow_zero=True),
            cors_origins=_origins(config.get("SSE_CORS_ORIGINS")),
            max_streams=_integer(config, "SSE_MAX_STREAMS", d.max_streams, minimum=1),
            max_request_bytes=_integer(
                config, "SSE_MAX_REQUEST_BYTES", d.max_request_bytes, minimum=64
            ),
            create_tables=_boolean(config, "SSE_CREATE_TABLES", d.create_tables),
            redis_lease=_number(config, "SSE_REDIS_LEASE", d.redis_lease),
            max_clients_per_stream=_integer(
                config, "SSE_MAX_CLIENTS_PER_STREAM", d.max_clients_per_stream, minimum=1
            ),
            max_clients_per_address=_integer(
                config, "SSE_MAX_CLIENTS_PER_ADDRESS", d.max_clients_per_address, minimum=1
            ),
            max_event_bytes=_integer(config, "SSE_MAX_EVENT_BYTES", d.max_event_bytes, minimum=256),
            shutdown_timeout=_number(
                config, "SSE_SHUTDOWN_TIMEOUT", d.shutdown_timeout, allow_zero=True
            ),
            write_timeout=_number(config, "SSE_WRITE_TIMEOUT", d.write_timeout),
            metrics=_boolean(config, "SSE_METRICS", d.metrics),
            log_format=_choice(config, "SSE_LOG_FORMAT", ("", "text", "json")),
            direct_writes=_boolean(config, "SSE_DIRECT_WRITES", d.direct_writes),
            hold_idle=_boolean(config, "SSE_HOLD_IDLE_READERS", d.hold_idle),
            body_timeout=_number(config, "SSE_BODY_TIMEOUT", d.body_timeout),
            max_streams_per_address=_integer(
                config, "SSE_MAX_STREAMS_PER_ADDRESS", d.max_streams_per_address, minimum=1
            ),
            delivery=_choice(config, "SSE_DELIVERY", ("live", "durable")),
            max_durable_events=_integer(
                config, "SSE_MAX_DURABLE_EVENTS", d.max_durable_events, minimum=0
            ),
            max_meta_bytes=_integer(config, "SSE_MAX_META_BYTES", d.max_meta_bytes, minimum=2),
            gc_thresholds=_gc_thresholds(config, d.gc_thresholds),
        )

    def __post_init__(self) -> None:
        if self.delivery == "durable" and self.redis_url:
            raise ConfigError(
                'SSE_DELIVERY = "durable" works with the in-process backend only; with '
                "SSE_REDIS_URL, readers get what Redis has acknowledged (run it with appendonly)"
            )


def _optional_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _number(
    config: Mapping[str, Any], key: str, default: float, *, allow_zero: bool = False
) -> float:
    value = config.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if (
        isinstance(value, bool)
        or not math.isfinite(number)
        or number < 0
        or (number == 0 and not allow_zero)
    ):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{key} must be {kind} number of seconds, got {value!r}")
    return number


def _integer(config: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = config.get(key, default)
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return number


def _choice(config: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = config.get(key, choices[0])
    if value is None:
        value = ""
    if not isinstance(value, str) or value.lower() not in choices:
        shown = " or ".join(repr(c) for c in choices if c)
        raise ConfigError(f"{key} must be {shown} (or unset), got {value!r}")
    return value.lower()


def _boolean(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "0", "true", "false", "yes", "no"):
        return value.lower() in ("1", "true", "yes")
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _origins(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(o, str) for o in items):
        raise ConfigError(
            f"SSE_CORS_ORIGINS must be a comma-separated string or a list of origins, got {value!r}"
        )
    return tuple(o.strip().rstrip("/") for o in items if o.strip())


def _gc_thresholds(
    config: Mapping[str, Any], default: tuple[int, int, int] | None
) -> tuple[int, int, int] | None:
    """``SSE_GC_THRESHOLDS``: three integers (``gc.set_threshold``), or empty for Python's own."""
    value = config.get("SSE_GC_THRESHOLDS", default)
    if value is None or value == "" or value == ():
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        numbers = tuple(int(str(x).strip()) for x in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or min(numbers) < 1:
        raise ConfigError(
            "SSE_GC_THRESHOLDS must be three positive integers (e.g. 50000,50,10), or empty to "
            f"keep Python's, got {value!r}"
        )
    return numbers[0], numbers[1], numbers[2]
