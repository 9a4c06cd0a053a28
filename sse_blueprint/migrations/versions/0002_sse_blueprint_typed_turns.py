"""sse_blueprint: typed turns (block kind, meta, complete; replayed app events)

Revision ID: sse0002
Revises: sse0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "sse0002"
down_revision = "sse0001"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("sse_turn_blocks") as batch:
        batch.add_column(
            sa.Column("meta", sa.JSON(), server_default=sa.text("'{}'"), nullable=False)
        )
        batch.add_column(
            sa.Column("complete", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
        batch.alter_column(
            "kind", existing_type=sa.String(32), type_=sa.String(64), existing_nullable=False
        )
    # Blocks of 0.1 had no end; those of a stream that finished are complete.
    op.execute(
        "UPDATE sse_turn_blocks SET complete = true WHERE stream_id IN "
        "(SELECT id FROM sse_streams WHERE state <> 'running')"
    )
    op.create_table(
        "sse_turn_events",
        sa.Column("id", BigInt, autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.String(64), nullable=False),
        sa.Column("slot", sa.String(160), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("event", sa.String(128), nullable=False),
        sa.Column("replay", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sse_turn_events"),
        sa.UniqueConstraint("stream_id", "slot", name="uq_sse_turn_events_stream_id_slot"),
        sa.ForeignKeyConstraint(
            ["stream_id"],
            ["sse_streams.id"],
            name="fk_sse_turn_events_stream_id_sse_streams",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_sse_turn_events_stream_id_event_id", "sse_turn_events", ["stream_id", "event_id"]
    )


def downgrade() -> None:
    # Lossy, as any downgrade past a feature: meta, ends and app events go; long kinds are cut.
    op.execute("UPDATE sse_turn_blocks SET kind = substr(kind, 1, 32) WHERE length(kind) > 32")
    op.drop_index("ix_sse_turn_events_stream_id_event_id", table_name="sse_turn_events")
    op.drop_table("sse_turn_events")
    with op.batch_alter_table("sse_turn_blocks") as batch:
        batch.alter_column(
            "kind", existing_type=sa.String(64), type_=sa.String(32), existing_nullable=False
        )
        batch.drop_column("complete")
        batch.drop_column("meta")
