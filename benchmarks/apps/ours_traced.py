"""The benchmark app with two endpoints that show where its memory goes (tracemalloc).

Served by ``benchmarks.idle_profile`` with ``PYTHONTRACEMALLOC`` set: ``/_mem/mark`` takes a
snapshot, ``/_mem/diff`` answers what was allocated since, by source line, as JSON.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

from benchmarks.apps.ours import app

_marks: dict[str, tracemalloc.Snapshot] = {}


@app.get("/_mem/mark")
def mark() -> dict[str, Any]:
    gc.collect()
    _marks["mark"] = tracemalloc.take_snapshot()
    return {"ok": True}


@app.get("/_mem/diff")
def diff() -> dict[str, Any]:
    gc.collect()
    stats = tracemalloc.take_snapshot().compare_to(_marks["mark"], "lineno")
    return {
        "lines": [
            {
                "file": s.traceback[0].filename,
                "line": s.traceback[0].lineno,
                "bytes": s.size_diff,
                "blocks": s.count_diff,
            }
            for s in stats
            if s.size_diff > 0
        ]
    }
