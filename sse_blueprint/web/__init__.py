"""The web layer: the Flask extension, its blueprint and what the views answer.

    extension  SSE: producers, hooks, init_app, start / active / stream_response
    state      what the extension keeps per app; shutdown of every app in the process
    views      the blueprint's endpoints (thin)
    service    streams wherever they live (here, mirrored, in the store): find, status, cancel
    answers    a reader's answer in each format, refusals, store calls
    aisdk      the AI SDK's UI message stream, translated from our events
    guard      request hygiene: JSON-only POSTs, body deadlines, routing refusals

Imports the engine, the transport, the storage and the config; the engine imports none of this.
"""

from __future__ import annotations

from .extension import SSE, InputError
from .state import shutdown

__all__ = ["SSE", "InputError", "shutdown"]
