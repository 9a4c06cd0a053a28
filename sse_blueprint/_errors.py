"""The one error an outage is told by, whichever part is away (:class:`Unavailable`).

Imports nothing of the package: the storage, the backends, the engine and the web layer all
import this.
"""

from __future__ import annotations

__all__ = ["Unavailable"]


class Unavailable(Exception):
    """The store or the shared backend cannot answer now (an outage): retry shortly.

    Raised at their boundary (:class:`~sse_blueprint.SQLStore`, the Redis backend) in place of
    the driver's own error, which is kept as ``__cause__``: the layers above know no driver, and
    the web layer answers ``503`` with ``Retry-After``.
    """
