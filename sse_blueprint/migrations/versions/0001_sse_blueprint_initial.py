"""sse_blueprint: stream records and turn blocks

Revision ID: sse0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "sse0001"
down_revision = None
branch_labels = ("sse_blueprint",)
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sse_streams",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("producer", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("terminal_event", sa.String(32), nullable=True),
        sa.Column("terminal_event_id", sa.BigInteger(), nullable=True),
        sa.Column("terminal_data", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("finished_at", Stamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sse_streams"),
    )
    op.create_index("ix_sse_streams_state", "sse_streams", ["state"])
    op.create_table(
        "sse_turn_blocks",
        sa.Column("id", BigInt, autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.String(64), nullable=False),
        sa.Column("block_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("first_event_id", sa.BigInteger(), nullable=False),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sse_turn_blocks"),
        sa.UniqueConstraint(
            "stream_id", "block_index", name="uq_sse_turn_blocks_stream_id_block_index"
        ),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["sse_streams.id"],
            name="fk_sse_turn_blocks_stream_id_sse_streams",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_sse_turn_blocks_stream_id_last_event_id",
        "sse_turn_blocks",
        ["stream_id", "last_event_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_sse_turn_blocks_stream_id_last_event_id", table_name="sse_turn_blocks")
    op.drop_table("sse_turn_blocks")
    op.drop_index("ix_sse_streams_state", table_name="sse_streams")
    op.drop_table("sse_streams")
