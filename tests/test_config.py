"""The SSE_* config keys: defaults, values from the environment (strings), clear errors."""

from __future__ import annotations

from typing import Any

import pytest

from sse_blueprint._config import ConfigError, SSEConfig


def test_defaults_and_strings_from_the_environment() -> None:
    config = SSEConfig.from_mapping({})
    assert config.gc_thresholds == (50_000, 50, 10)
    assert config.hold_idle is True
    assert SSEConfig.from_mapping({"SSE_HOLD_IDLE_READERS": "false"}).hold_idle is False
    config = SSEConfig.from_mapping(
        {"SSE_GC_THRESHOLDS": "20000, 20,5", "SSE_BUFFER_SIZE": "64", "SSE_DIRECT_WRITES": "no"}
    )
    assert config.gc_thresholds == (20_000, 20, 5)
    assert config.buffer_size == 64
    assert config.direct_writes is False
    assert SSEConfig.from_mapping({"SSE_GC_THRESHOLDS": ""}).gc_thresholds is None
    assert SSEConfig.from_mapping({"SSE_GC_THRESHOLDS": [1, 2, 3]}).gc_thresholds == (1, 2, 3)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SSE_GC_THRESHOLDS", "1,2"),
        ("SSE_GC_THRESHOLDS", "a,b,c"),
        ("SSE_GC_THRESHOLDS", "0,10,10"),
        ("SSE_GC_THRESHOLDS", 5),
        ("SSE_BUFFER_SIZE", "0"),
        ("SSE_HEARTBEAT_INTERVAL", "soon"),
        ("SSE_DELIVERY", "eventually"),
    ],
)
def test_a_bad_value_names_its_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        SSEConfig.from_mapping({key: value})
