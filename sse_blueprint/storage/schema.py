"""The library's tables (``sse_streams``, ``sse_turn_blocks``, ``sse_turn_events``) on its own
:data:`metadata`, which a host app can hand to Alembic next to its own (see the README), and
creating or upgrading them in place for apps that let the library do it.

Imports SQLAlchemy only; it must not import the engine or the store.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

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
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "StreamRow", "TurnBlockRow", "TurnEventRow", "blocks", "create_all", "events", "metadata",
    "streams", "upgrade_in_place",
]  # fmt: skip

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


streams = metadata.tables["sse_streams"]
blocks = metadata.tables["sse_turn_blocks"]
events = metadata.tables["sse_turn_events"]


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
