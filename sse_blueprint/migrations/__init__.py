"""Alembic migrations for sse_blueprint's own tables (``sse_streams``, ``sse_turn_blocks``).

They live on their own branch (label ``sse_blueprint``) and record their revision in their own
table, ``sse_blueprint_alembic_version``, so they never touch your app's migration history::

    python -m sse_blueprint.migrations upgrade postgresql+psycopg://app@db/app
    python -m sse_blueprint.migrations downgrade sqlite:///instance/app.sqlite3 base

or from Python: ``sse_blueprint.migrations.upgrade(url)``. Set ``SSE_CREATE_TABLES = False``
once migrations manage the tables. (Alternatively add ``sse_blueprint.metadata`` to your own
Alembic ``target_metadata`` and let autogenerate write the tables into your own chain.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["VERSION_TABLE", "downgrade", "upgrade"]

VERSION_TABLE = "sse_blueprint_alembic_version"
HERE = Path(__file__).resolve().parent


def _config(url: str) -> object:
    from alembic.config import Config  # alembic is an optional dependency: sse-blueprint[alembic]

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "heads") -> None:
    """Bring the sse_blueprint tables of the database at ``url`` to ``revision``."""
    from alembic import command

    command.upgrade(_config(url), revision)  # type: ignore[arg-type]


def downgrade(url: str, revision: str = "base") -> None:
    """Take the sse_blueprint tables back to ``revision`` (``base`` drops them)."""
    from alembic import command

    command.downgrade(_config(url), revision)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or args[0] not in ("upgrade", "downgrade"):
        print("usage: python -m sse_blueprint.migrations upgrade|downgrade URL [REVISION]")
        return 2
    action, url, *revision = args
    (upgrade if action == "upgrade" else downgrade)(url, *revision)
    return 0
