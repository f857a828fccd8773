"""usage: one row per request, indexed for the time range, per-key and per-end-user questions.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime, nullable=False),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("key_name", sa.Text, nullable=True),
        sa.Column("end_user", sa.Text, nullable=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("ttft_seconds", sa.Float, nullable=True),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error_type", sa.Text, nullable=True),
        sa.Column("fallback", sa.Boolean, nullable=False),
    )
    op.create_index("ix_usage_time", "usage", ["time"])
    op.create_index("ix_usage_key_id_time_tokens", "usage", ["key_id", "time", "prompt_tokens", "completion_tokens"])
    op.create_index("ix_usage_end_user_time", "usage", ["end_user", "time"])


def downgrade() -> None:
    op.drop_table("usage")
