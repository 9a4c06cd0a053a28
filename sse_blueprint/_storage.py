"""Turn blocks and stream records in SQLAlchemy (SQLite or PostgreSQL).

Tables (``sse_streams``, ``sse_turn_blocks``, ``sse_turn_events``) are defined on this module's
own :data:`metadata`,
which a host app can hand to Alembic next to its own (see the README). Every call is one short
transaction; nothing is held while a response streams.

gevent: PostgreSQL goes through psycopg 3, which cooperates with gevent by itself (3.1.14+).
SQLite is a C library that blocks its thread, so each SQLite call runs in gevent's threadpool and
only the calling greenlet waits. A file database uses a fresh connection per call (cheap for SQLite,
and no pool lock shared between threads); ``sqlite://`` (in memory) keeps one connection and runs
on the calling greenlet, which is fine for tests and nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import gevent
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
    type_coerce,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool, StaticPool

from ._batch import Batcher
from ._records import StoredTurn, StreamRecord, TurnBlock, TurnEvent

__all__ = [
    "SQLStore",
    "StreamRow",
    "TurnBlockRow",
    "TurnEventRow",
    "create_all",
    "metadata",
    "run_blocking",
]

T = TypeVar("T")

#: The library's tables. Include it in your Alembic ``target_metadata`` (a list is allowed).
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_BigInt = BigInteger().with_variant(Integer, "sqlite")


class _Base(DeclarativeBase):
    metadata = metadata


class StreamRow(_Base):
    """One row per stream: its state, position and terminal event."""

    __tablename__ = "sse_streams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    producer: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    terminal_event: Mapped[str | None] = mapped_column(String(32))
    terminal_event_id: Mapped[int | None] = mapped_column(BigInteger)
    terminal_data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class TurnBlockRow(_Base):
    """One row per block of a stream: its content as of ``last_event_id``."""

    __tablename__ = "sse_turn_blocks"
    __table_args__ = (
        UniqueConstraint("stream_id", "block_index"),
        # Catch-up asks for the blocks of a stream whose last covered id is past a position.
        Index(None, "stream_id", "last_event_id"),
    )

    id: Mapped[int] = mapped_column(_BigInt, primary_key=True, autoincrement=True)
    stream_id: Mapped[str] = mapped_column(ForeignKey("sse_streams.id", ondelete="CASCADE"))
    block_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, server_default=text("'{}'"))
    content: Mapped[str] = mapped_column(Text)
    complete: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    first_event_id: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class TurnEventRow(_Base):
    """A replayed app event of a stream: every ``durable`` one (``slot`` = ``#<id>``) and the
    newest ``latest`` one of each name (``slot`` = ``latest:<name>``, replaced by newer ones)."""

    __tablename__ = "sse_turn_events"
    __table_args__ = (
        UniqueConstraint("stream_id", "slot"),
        Index(None, "stream_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(_BigInt, primary_key=True, autoincrement=True)
    stream_id: Mapped[str] = mapped_column(ForeignKey("sse_streams.id", ondelete="CASCADE"))
    slot: Mapped[str] = mapped_column(String(160))
    event_id: Mapped[int] = mapped_column(BigInteger)
    event: Mapped[str] = mapped_column(String(128))
    replay: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


_streams = metadata.tables["sse_streams"]
_blocks = metadata.tables["sse_turn_blocks"]
_events = metadata.tables["sse_turn_events"]


def _slot(event: TurnEvent) -> str:
    return f"latest:{event.event}" if event.replay == "latest" else f"#{event.event_id}"


def _to_datetime(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _to_timestamp(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


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
        self._upserts = _upserts(self._insert, returning=dialect == "postgresql")
        max_batch = MAX_BATCH if self._threaded else MAX_BATCH_COOPERATIVE
        self._saves: Batcher[_Save, None] = Batcher(self._write, max_batch)
        if create_tables:
            self._call(create_all, metadata, self.engine)
            self._call(upgrade_in_place, self.engine)

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking DB call without blocking the gevent hub (SQLite: threadpool)."""
        return run_blocking(func, *args) if self._threaded else func(*args)

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
            for group in _distinct_streams(batch):
                streams = [_stream_row(save.record, now) for save in group]
                blocks = [_block_row(b, now) for save in group for b in save.blocks]
                events = [_event_row(e, now) for save in group for e in save.events]
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
        created = _to_timestamp(m["created_at"])
        return StreamRecord(
            stream_id=m["id"],
            producer=m["producer"],
            state=m["state"],
            last_event_id=m["last_event_id"],
            created_at=created if created is not None else 0.0,
            metadata=m["metadata"] or {},
            finished_at=_to_timestamp(m["finished_at"]),
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
            TurnBlock(stream_id, index, kind, content, first, last, _meta(meta), bool(complete))
            for index, kind, meta, content, complete, first, last in block_rows
        ]
        events = [
            TurnEvent(stream_id, r.event_id, r.event, r.data or {}, r.replay) for r in event_rows
        ]
        return StoredTurn(blocks, events)


def create_all(meta: MetaData, engine: Engine) -> None:
    """``meta.create_all`` that tolerates other processes doing the same at the same moment.

    Several gunicorn workers boot at once: each checks that a table is missing and creates it,
    and all but one fail with "already exists". A failure is retried after a pause; once the
    tables exist the check finds them and nothing is created.
    """
    for attempt in range(5):
        try:
            meta.create_all(engine)
            return
        except DatabaseError:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _upserts(insert: Callable[[Table], Any], returning: bool) -> tuple[Any, Any, Any]:
    """The three forward-only upserts (streams, blocks, events), built once; ``returning``
    adds a RETURNING of one key column (see :class:`SQLStore`)."""
    streams = insert(_streams)
    stream_columns = [c.name for c in _streams.c if c.name not in ("id", "producer", "created_at")]
    upsert_streams = streams.on_conflict_do_update(
        index_elements=[_streams.c.id],
        set_={name: streams.excluded[name] for name in stream_columns},
        # Forward only: a stream that ended stays as it ended (the first terminal wins).
        where=(_streams.c.state == "running")
        & (_streams.c.last_event_id <= streams.excluded.last_event_id),
    )
    blocks = insert(_blocks)
    upsert_blocks = blocks.on_conflict_do_update(
        index_elements=[_blocks.c.stream_id, _blocks.c.block_index],
        set_={
            name: blocks.excluded[name]
            for name in ("kind", "meta", "content", "complete", "last_event_id", "updated_at")
        },
        # Forward only: never replace a block with an older version of itself.
        where=_blocks.c.last_event_id < blocks.excluded.last_event_id,
    )
    events = insert(_events)
    upsert_events = events.on_conflict_do_update(
        index_elements=[_events.c.stream_id, _events.c.slot],
        set_={"event_id": events.excluded.event_id, "data": events.excluded.data},
        # Forward only: a durable event is written once; a latest one replaced only by a newer
        # event of its name.
        where=_events.c.event_id < events.excluded.event_id,
    )
    if returning:
        return (
            upsert_streams.returning(_streams.c.id),
            upsert_blocks.returning(_blocks.c.block_index),
            upsert_events.returning(_events.c.slot),
        )
    return upsert_streams, upsert_blocks, upsert_events


def _distinct_streams(batch: Sequence[_Save]) -> list[list[_Save]]:
    """``batch`` in groups where no stream appears twice (an upsert may touch a row once)."""
    groups: list[list[_Save]] = []
    seen: list[set[str]] = []
    for save in batch:
        stream_id = save.record.stream_id
        for group, ids in zip(groups, seen, strict=True):
            if stream_id not in ids:
                group.append(save)
                ids.add(stream_id)
                break
        else:
            groups.append([save])
            seen.append({stream_id})
    return groups


def _stream_row(record: StreamRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "id": record.stream_id,
        "producer": record.producer,
        "state": record.state,
        "metadata": dict(record.metadata),
        "last_event_id": record.last_event_id,
        "terminal_event": record.terminal,
        "terminal_event_id": record.terminal_id,
        "terminal_data": None if record.terminal_data is None else dict(record.terminal_data),
        "created_at": _to_datetime(record.created_at),
        "updated_at": now,
        "finished_at": _to_datetime(record.finished_at),
    }


def _block_row(b: TurnBlock, now: dt.datetime) -> dict[str, Any]:
    return {
        "stream_id": b.stream_id,
        "block_index": b.block,
        "kind": b.kind,
        "meta": dict(b.meta),
        "content": b.content,
        "complete": b.complete,
        "first_event_id": b.first_event_id,
        "last_event_id": b.last_event_id,
        "created_at": now,
        "updated_at": now,
    }


def _event_row(e: TurnEvent, now: dt.datetime) -> dict[str, Any]:
    return {
        "stream_id": e.stream_id,
        "slot": _slot(e),
        "event_id": e.event_id,
        "event": e.event,
        "replay": e.replay,
        "data": dict(e.data),
        "created_at": now,
    }


def _meta(raw: str | dict[str, Any] | None) -> Mapping[str, Any]:
    """A block's meta as read (JSON text): most blocks have none, so skip decoding ``{}``."""
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "{}":
        return {}
    value: dict[str, Any] = json.loads(raw)
    return value


def upgrade_in_place(engine: Engine) -> None:
    """Add what this release's tables have that a database made by 0.1 lacks (for apps that let
    the library create its tables; with migrations, ``sse0002`` does the same)."""
    columns = {c["name"] for c in inspect(engine).get_columns("sse_turn_blocks")}
    if "meta" in columns and "complete" in columns:
        return
    try:
        _add_turn_columns(engine, columns)
    except DatabaseError:  # another worker booting at the same moment added them first
        columns = {c["name"] for c in inspect(engine).get_columns("sse_turn_blocks")}
        if not {"meta", "complete"} <= columns:
            raise


def _add_turn_columns(engine: Engine, columns: set[str]) -> None:
    with engine.begin() as conn:
        if "meta" not in columns:
            conn.execute(
                text("ALTER TABLE sse_turn_blocks ADD COLUMN meta JSON NOT NULL DEFAULT '{}'")
            )
        if "complete" not in columns:
            conn.execute(
                text(
                    "ALTER TABLE sse_turn_blocks ADD COLUMN complete BOOLEAN NOT NULL DEFAULT false"
                )
            )
            conn.execute(text(_COMPLETE_FINISHED))
        if engine.dialect.name == "postgresql":  # (SQLite does not enforce lengths)
            conn.execute(text("ALTER TABLE sse_turn_blocks ALTER COLUMN kind TYPE VARCHAR(64)"))


#: Blocks of 0.1 had no end; those of a stream that finished are complete.
_COMPLETE_FINISHED = (
    "UPDATE sse_turn_blocks SET complete = true WHERE stream_id IN "
    "(SELECT id FROM sse_streams WHERE state <> 'running')"
)


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
