"""Turn blocks and stream records in SQLAlchemy (SQLite or PostgreSQL): :class:`SQLStore`.

Every call is one short transaction; nothing is held while a response streams.

gevent: PostgreSQL goes through psycopg 3, which cooperates with gevent by itself (3.1.14+).
SQLite is a C library that blocks its thread, so each SQLite call runs in gevent's threadpool and
only the calling greenlet waits. A file database uses a fresh connection per call (cheap for SQLite,
and no pool lock shared between threads); ``sqlite://`` (in memory) keeps one connection and runs
on the calling greenlet, which is fine for tests and nothing else.

Imports SQLAlchemy, the batcher and this package's modules; it must not import the engine.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import gevent
from sqlalchemy import Engine, Table, Text, create_engine, event, select, type_coerce
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import NullPool, StaticPool

from .._batch import Batcher
from .._errors import Unavailable
from .records import StoredTurn, StreamRecord, TurnBlock, TurnEvent
from .schema import blocks as _blocks
from .schema import create_all, metadata, upgrade_in_place
from .schema import events as _events
from .schema import streams as _streams
from .statements import (
    block_row,
    distinct_streams,
    event_row,
    stream_row,
    to_timestamp,
    upserts,
)
from .statements import meta as block_meta

__all__ = ["SQLStore", "run_blocking"]

T = TypeVar("T")

# What a database that is away (down, restarting, locked, out of connections) raises.
_OUTAGES = (sa_exc.OperationalError, sa_exc.TimeoutError, sa_exc.DisconnectionError, OSError)

#: Saves written in one transaction at most (each one a few statements). SQLite's run in a
#: threadpool thread, which hands Python's GIL back to the hub every few milliseconds however
#: long the batch: at 2,000 streams, batches of 64 left the writer 1-2 s behind the blocks as
#: they ended, batches of 512 keep it within 0.2 s. PostgreSQL's run on the hub, where each
#: round trip waits a turn of the event loop, which on a busy worker is long: a transaction
#: then must carry all that is due, or the writer falls behind.
MAX_BATCH = 512
MAX_BATCH_COOPERATIVE = 2048


class _Save:
    """One :meth:`SQLStore.save` call waiting for its transaction."""

    __slots__ = ("blocks", "events", "record")

    def __init__(
        self, record: StreamRecord, blocks: Sequence[TurnBlock], events: Sequence[TurnEvent]
    ) -> None:
        self.record, self.blocks, self.events = record, blocks, events


class SQLStore:
    """A :class:`~sse_blueprint.BlockStore` on SQLAlchemy: SQLite (default) or PostgreSQL.

    ``url`` is a SQLAlchemy URL (``sqlite:////path/db.sqlite3``,
    ``postgresql+psycopg://user@host/db``) or an :class:`~sqlalchemy.Engine` of your own.
    """

    def __init__(self, url: str | Engine, *, create_tables: bool = True) -> None:
        self.engine = url if isinstance(url, Engine) else _make_engine(url)
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(
                f"SSE_DATABASE_URL: {dialect} is not supported; use SQLite or PostgreSQL"
            )
        # Both dialects have INSERT ... ON CONFLICT DO UPDATE ... WHERE, with the same API.
        self._insert: Callable[[Table], Any] = (
            sqlite.insert if dialect == "sqlite" else postgresql.insert
        )
        memory = dialect == "sqlite" and self.engine.url.database in (None, "", ":memory:")
        self._threaded = dialect == "sqlite" and not memory
        # PostgreSQL's upserts carry a RETURNING: SQLAlchemy then sends a batch as multi-row
        # INSERTs ("insertmanyvalues", which it uses for an ON CONFLICT statement only with a
        # RETURNING) rather than psycopg's executemany, which waits for the socket once or twice
        # per row. On a busy worker each wait is a turn of the event loop: 1,400 saves took 29 s
        # with 500 greenlets busy (5,638 waits), against a few waits now.
        self._upserts = upserts(self._insert, returning=dialect == "postgresql")
        max_batch = MAX_BATCH if self._threaded else MAX_BATCH_COOPERATIVE
        self._saves: Batcher[_Save, None] = Batcher(self._write, max_batch)
        if create_tables:
            self._call(create_all, metadata, self.engine)
            self._call(upgrade_in_place, self.engine)

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking DB call without blocking the gevent hub (SQLite: threadpool). An
        outage (the database away, locked, out of connections) is raised as
        :class:`Unavailable`."""
        try:
            return run_blocking(func, *args) if self._threaded else func(*args)
        except _OUTAGES as exc:
            raise Unavailable(f"database: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- the BlockStore interface ------------------------------------------------------------

    def save(
        self,
        record: StreamRecord,
        blocks: Sequence[TurnBlock],
        events: Sequence[TurnEvent] = (),
    ) -> None:
        """Write one stream's changes. Saves that arrive while a write is under way (many
        streams persisting at once) go together in the next transaction: one connection and
        one commit for all of them. If that transaction fails, each is retried alone, so one
        bad save fails only its own caller."""
        self._saves.submit(_Save(record, blocks, events))  # raises what failed its write

    def _write(self, batch: Sequence[_Save]) -> list[BaseException | None]:
        try:
            self._call(self._save_all, batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            return [self._write([save])[0] for save in batch]  # each alone: who failed?
        return [None] * len(batch)

    def load_stream(self, stream_id: str) -> StreamRecord | None:
        return self._call(self._load_stream, stream_id)

    def load_turn(self, stream_id: str, after_id: int) -> StoredTurn:
        return self._call(self._load_turn, stream_id, after_id)

    def load_blocks(self, stream_id: str, after_id: int) -> list[TurnBlock]:
        """Only the blocks of :meth:`load_turn`."""
        return list(self.load_turn(stream_id, after_id).blocks)

    # -- the work, on whatever thread _call picked --------------------------------------------

    def _save_all(self, batch: Sequence[_Save]) -> None:
        """Write every save of ``batch`` in one transaction: one statement per table for all of
        them (an executemany of statements compiled once), per group of distinct streams."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            for group in distinct_streams(batch):
                streams = [stream_row(save.record, now) for save in group]
                blocks = [block_row(b, now) for save in group for b in save.blocks]
                events = [event_row(e, now) for save in group for e in save.events]
                conn.execute(self._upserts[0], streams)
                if blocks:
                    conn.execute(self._upserts[1], blocks)
                if events:
                    conn.execute(self._upserts[2], events)

    def _load_stream(self, stream_id: str) -> StreamRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_streams).where(_streams.c.id == stream_id)).first()
        if row is None:
            return None
        m = row._mapping
        created = to_timestamp(m["created_at"])
        return StreamRecord(
            stream_id=m["id"],
            producer=m["producer"],
            state=m["state"],
            last_event_id=m["last_event_id"],
            created_at=created if created is not None else 0.0,
            metadata=m["metadata"] or {},
            finished_at=to_timestamp(m["finished_at"]),
            terminal=m["terminal_event"],
            terminal_id=m["terminal_event_id"],
            terminal_data=m["terminal_data"],
        )

    def _load_turn(self, stream_id: str, after_id: int) -> StoredTurn:
        c = _blocks.c  # only the columns a catch-up needs (no timestamps to parse)
        block_query = (
            select(
                c.block_index, c.kind, type_coerce(c.meta, Text).label("meta"), c.content,
                c.complete, c.first_event_id, c.last_event_id,
            )
            .where(c.stream_id == stream_id, c.last_event_id > after_id)
            .order_by(c.last_event_id)
        )  # fmt: skip
        e = _events.c
        event_query = (
            select(e.event_id, e.event, e.replay, e.data)
            .where(e.stream_id == stream_id, e.event_id > after_id)
            .order_by(e.event_id)
        )
        with self.engine.connect() as conn:
            block_rows = conn.execute(block_query).all()
            event_rows = conn.execute(event_query).all()
        blocks = [  # (positional: this runs once per block of every catch-up)
            TurnBlock(
                stream_id, index, kind, content, first, last, block_meta(meta_json), bool(complete)
            )
            for index, kind, meta_json, content, complete, first, last in block_rows
        ]
        events = [
            TurnEvent(stream_id, r.event_id, r.event, r.data or {}, r.replay) for r in event_rows
        ]
        return StoredTurn(blocks, events)


def run_blocking(func: Callable[..., T], *args: Any) -> T:
    """Call ``func(*args)`` in gevent's threadpool; only the calling greenlet waits.

    For blocking C libraries such as SQLite. Exceptions are raised in the caller (and not also
    printed by gevent from the worker thread).
    """
    ok, value = gevent.get_hub().threadpool.apply(_capture, (func, args))
    if not ok:
        raise value
    result: T = value
    return result


def _capture(func: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    try:
        return True, func(*args)
    except Exception as exc:
        return False, exc


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            poolclass=StaticPool if memory else NullPool,
            connect_args={"check_same_thread": False, "timeout": 5},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # PostgreSQL (psycopg 3): a pool sized for greenlets, short waits, dead connections dropped.
    engine = create_engine(
        url, pool_size=10, max_overflow=20, pool_timeout=10, pool_pre_ping=True, pool_recycle=1800
    )
    return engine
