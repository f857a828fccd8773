"""usage.admitted: whether a request passed admission (its key's models and limits, the door) and was sent on.

A key's requests and tokens per minute count admitted requests only: a refused one (a model the key may not
use, a bad body, a 429 of the limits themselves) is recorded for the report but does not spend the limit,
or a client retrying its refusals would never get back in. Rows from before are admitted (they were all
served or failed upstream: refusals were not told apart). The per-key index leads with the filter.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("admitted", sa.Boolean, nullable=False, server_default=sa.true()))
    op.drop_index("ix_usage_key_id_time_tokens", table_name="usage")
    op.create_index(
        "ix_usage_key_id_admitted_time_tokens",
        "usage",
        ["key_id", "admitted", "time", "prompt_tokens", "completion_tokens"],
    )


def downgrade() -> None:
    op.drop_index("ix_usage_key_id_admitted_time_tokens", table_name="usage")
    op.create_index("ix_usage_key_id_time_tokens", "usage", ["key_id", "time", "prompt_tokens", "completion_tokens"])
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("admitted")
