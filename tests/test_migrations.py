"""The shipped Alembic migration builds exactly the tables the models describe."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sse_blueprint import migrations
from sse_blueprint.engine import replay
from sse_blueprint.storage.records import StreamRecord, TurnBlock, TurnEvent
from sse_blueprint.storage.schema import metadata
from sse_blueprint.storage.sql import SQLStore
from tests.conftest import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrated.sqlite3'}"
    pg: PostgresServer = request.getfixturevalue("postgres")
    name = "m_" + uuid.uuid4().hex[:12]
    pg.psql(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def test_migration_matches_the_models_and_downgrades(empty_db: str) -> None:
    # The command-line helper, in a subprocess, as a user would run it.
    subprocess.run(
        [sys.executable, "-m", "sse_blueprint.migrations", "upgrade", empty_db], check=True
    )
    engine = sa.create_engine(empty_db)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": migrations.VERSION_TABLE}
            )
            diff = compare_metadata(context, metadata)
            tables = set(sa.inspect(conn).get_table_names())
        assert diff == []
        assert {"sse_streams", "sse_turn_blocks", migrations.VERSION_TABLE} <= tables
        assert "alembic_version" not in tables  # the app's own history is left alone
        store = SQLStore(empty_db, create_tables=False)
        record = StreamRecord("m1", "demo", "running", 3, 1.0)
        store.save(record, [TurnBlock("m1", 0, "text", "hé", 2, 3)])
        assert store.load_blocks("m1", 0)[0].content == "hé"
        store.close()
        migrations.downgrade(empty_db)
        with engine.connect() as conn:
            left = set(sa.inspect(conn).get_table_names())
        assert not {"sse_streams", "sse_turn_blocks"} & left
    finally:
        engine.dispose()


def test_cli_usage_error() -> None:
    assert migrations.main(["sideways"]) == 2


def made_by_0_1(url: str) -> None:
    """A database as release 0.1 left it: its schema (revision sse0001) and rows it wrote."""
    migrations.upgrade(url, "sse0001")
    engine = sa.create_engine(url)
    now = "2026-11-30 12:00:00+00:00"
    with engine.begin() as conn:
        for stream_id, state, terminal in [
            ("old-done", "done", "done"),
            ("old-run", "running", None),
        ]:
            conn.execute(
                sa.text(
                    "INSERT INTO sse_streams (id, producer, state, metadata, last_event_id, "
                    "terminal_event, terminal_event_id, terminal_data, created_at, updated_at) "
                    "VALUES (:id, 'demo', :state, '{}', 9, :t, :tid, :td, :now, :now)"
                ),
                {"id": stream_id, "state": state, "t": terminal, "tid": 9 if terminal else None,
                 "td": '{"blocks": 2}' if terminal else None, "now": now},
            )  # fmt: skip
            for index, (content, first, last) in enumerate([("Hello ", 2, 4), ("world", 5, 8)]):
                conn.execute(
                    sa.text(
                        "INSERT INTO sse_turn_blocks (stream_id, block_index, kind, content, "
                        "first_event_id, last_event_id, created_at, updated_at) VALUES "
                        "(:s, :i, 'text', :c, :f, :l, :now, :now)"
                    ),
                    {"s": stream_id, "i": index, "c": content, "f": first, "l": last, "now": now},
                )
    engine.dispose()


def check_upgraded(url: str) -> None:
    """The 0.1 rows read back as typed blocks, and the new tables take typed turns."""
    store = SQLStore(url, create_tables=False)
    try:
        done = store.load_turn("old-done", 0)
        assert [(b.kind, b.content, b.meta, b.complete) for b in done.blocks] == [
            ("text", "Hello ", {}, True),
            ("text", "world", {}, True),
        ]
        assert done.events == []
        running = store.load_turn("old-run", 3)  # 0.1 never ended a block of a running stream
        assert [(b.block, b.complete) for b in running.blocks] == [(0, False), (1, False)]
        record = store.load_stream("old-done")
        assert record is not None
        events = replay(record, done, 0)
        assert [(e.id, e.event) for e in events] == [
            (1, "start"), (4, "turnblock_catchup"), (8, "turnblock_catchup"), (9, "done")
        ]  # fmt: skip
        assert events[1].data == {
            "block": 0, "kind": "text", "meta": {}, "content": "Hello ", "complete": True
        }  # fmt: skip
        new = StreamRecord("new", "script", "running", 5, 1.0)
        kind = "app." + "k" * 60  # the longest kind the contract allows (64 characters)
        store.save(
            new,
            [TurnBlock("new", 0, kind, "{}", 2, 3, {"name": "x"}, True)],
            [TurnEvent("new", 4, "citation", {"n": 1}), TurnEvent("new", 5, "p", {}, "latest")],
        )
        turn = store.load_turn("new", 0)
        assert turn.blocks[0].kind == kind
        assert turn.blocks[0].meta == {"name": "x"}
        assert [(e.event_id, e.replay) for e in turn.events] == [(4, "durable"), (5, "latest")]
    finally:
        store.close()


def test_migration_upgrades_a_database_made_by_0_1(empty_db: str) -> None:
    made_by_0_1(empty_db)
    subprocess.run(
        [sys.executable, "-m", "sse_blueprint.migrations", "upgrade", empty_db], check=True
    )
    check_upgraded(empty_db)
    engine = sa.create_engine(empty_db)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": migrations.VERSION_TABLE}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
    migrations.downgrade(empty_db, "sse0001")  # and back: 0.1's schema, its rows kept
    store = SQLStore(empty_db, create_tables=False)
    engine = sa.create_engine(empty_db)
    try:
        with engine.connect() as conn:
            names = {c["name"] for c in sa.inspect(conn).get_columns("sse_turn_blocks")}
            tables = set(sa.inspect(conn).get_table_names())
        assert "meta" not in names
        assert "sse_turn_events" not in tables
        count = "SELECT count(*) FROM sse_turn_blocks WHERE stream_id = 'old-done'"
        with engine.connect() as conn:
            assert conn.execute(sa.text(count)).scalar() == 2
    finally:
        store.close()
        engine.dispose()


def test_library_made_tables_from_0_1_are_upgraded_in_place(empty_db: str) -> None:
    """An app that lets the library create its tables (the default) and upgrades from 0.1."""
    made_by_0_1(empty_db)
    SQLStore(empty_db).close()  # SSE_CREATE_TABLES = True: create what is missing, add columns
    check_upgraded(empty_db)
    engine = sa.create_engine(empty_db)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            diff = [d for d in compare_metadata(context, metadata) if d[0] != "remove_table"]
        if empty_db.startswith("sqlite"):
            # SQLite keeps the declared VARCHAR(32) of ``kind``; it enforces no length at all.
            diff = [d for d in diff if not (isinstance(d, list) and d[0][3] == "kind")]
        assert diff == []  # the same schema as the migration makes (server defaults aside)
    finally:
        engine.dispose()
