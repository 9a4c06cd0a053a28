"""Storage: what the engine persists, and a store on SQLAlchemy.

    records     StreamRecord, TurnBlock, TurnEvent, StoredTurn and the BlockStore interface
                (no SQLAlchemy: the engine imports only this)
    schema      the tables on their own MetaData (for Alembic), created or upgraded in place
    statements  the forward-only upserts and the conversions between records and rows
    sql         SQLStore: SQLite through gevent's threadpool, PostgreSQL through psycopg 3

Importing this package imports no SQLAlchemy; ``storage.sql`` and ``storage.schema`` do. Nothing
here imports the engine, a backend or the web layer.
"""

from __future__ import annotations

from .records import BlockStore, StoredTurn, StreamRecord, TurnBlock, TurnEvent

__all__ = ["BlockStore", "StoredTurn", "StreamRecord", "TurnBlock", "TurnEvent"]
