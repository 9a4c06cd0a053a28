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
from sse_blueprint._records import StreamRecord, TurnBlock
from sse_blueprint._storage import SQLStore, metadata
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
