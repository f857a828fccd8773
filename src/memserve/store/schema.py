"""The tables as SQLAlchemy Core sees them at the newest revision (queries use these, never the migrations).

The migrations under ``migrations/versions/`` are frozen copies of how each revision changed the schema;
``tests/store/test_migrations.py`` checks that upgrading to head yields exactly these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData()


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime in Python, a naive UTC ``timestamp`` in SQL.

    Naive in the database so that ``date(time)`` means the UTC day on SQLite and Postgres alike
    (a ``timestamptz`` would follow the session's time zone); aware in Python so no caller can mix
    local and UTC times. A naive value is refused rather than guessed.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the store: pass a timezone-aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite functions (max, min) hand back the stored text
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False, unique=True),
    sa.Column("models", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("daily_tokens", sa.BigInteger, nullable=True),
    sa.Column("monthly_tokens", sa.BigInteger, nullable=True),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
)

usage = sa.Table(
    "usage",
    metadata,
    # BIGINT on Postgres; SQLite only autoincrements an INTEGER PRIMARY KEY (its rowid, 64 bits anyway).
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", UtcDateTime, nullable=False),
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
    # passed admission (the key's models and limits, the door) and was sent on; only these spend limits
    sa.Column("admitted", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Index("ix_usage_time", "time"),
    # (key_id, admitted, time) leads; the token columns make the limit queries' sums index-only (24× faster
    # on SQLite with 100,000 rows: the table is never read).
    sa.Index(
        "ix_usage_key_id_admitted_time_tokens", "key_id", "admitted", "time", "prompt_tokens", "completion_tokens"
    ),
    sa.Index("ix_usage_end_user_time", "end_user", "time"),
)

# Batch jobs (revision 0004): OpenAI's Files and Batch objects, and one row per finished request.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # file-…
    sa.Column("purpose", sa.Text, nullable=False),  # batch (an upload), batch_output (a job's output or errors)
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("key_id", sa.Text, nullable=True),  # who uploaded it (NULL: auth off, or the bootstrap admin key)
    sa.Index("ix_files_key_id_created_at", "key_id", "created_at"),
)

file_parts = sa.Table(
    "file_parts",
    metadata,
    # a file's content in 1 MiB parts: streamed in and out a part at a time, shared by every gateway
    sa.Column("file_id", sa.Text, primary_key=True),
    sa.Column("part", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # batch_…
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("completion_window", sa.Text, nullable=False),
    sa.Column("input_file_id", sa.Text, nullable=False),
    sa.Column("output_file_id", sa.Text, nullable=True),
    sa.Column("error_file_id", sa.Text, nullable=True),
    sa.Column("key_id", sa.Text, nullable=True),  # the key whose job it is: its requests are metered to it
    sa.Column("key_name", sa.Text, nullable=True),
    sa.Column("metadata", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("errors", sa.JSON(none_as_null=True), nullable=True),  # why validation failed, line by line
    sa.Column("total", sa.Integer, nullable=False),  # request_counts
    sa.Column("completed", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("in_progress_at", UtcDateTime, nullable=True),
    sa.Column("finalizing_at", UtcDateTime, nullable=True),
    sa.Column("completed_at", UtcDateTime, nullable=True),
    sa.Column("failed_at", UtcDateTime, nullable=True),
    sa.Column("expired_at", UtcDateTime, nullable=True),
    sa.Column("cancelling_at", UtcDateTime, nullable=True),
    sa.Column("cancelled_at", UtcDateTime, nullable=True),
    # which gateway runs it, until when (renewed while it runs): one runner per job across gateways
    sa.Column("holder", sa.Text, nullable=True),
    sa.Column("held_until", UtcDateTime, nullable=True),
    sa.Index("ix_batches_key_id_created_at", "key_id", "created_at"),
    sa.Index("ix_batches_status", "status"),
)

batch_results = sa.Table(
    "batch_results",
    metadata,
    # the primary key is the exactly-once: a request's result is recorded once, whatever was killed when
    sa.Column("batch_id", sa.Text, primary_key=True),
    sa.Column("custom_id", sa.Text, primary_key=True),
    sa.Column("line", sa.Integer, nullable=False),  # in the input file: output files keep the input's order
    sa.Column("ok", sa.Boolean, nullable=False),  # the output file's (True) or the errors file's (False)
    sa.Column("record", sa.Text, nullable=False),  # the JSONL line, as written to that file
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Index("ix_batch_results_batch_id_line", "batch_id", "line"),
)

adapters = sa.Table(
    "adapters",
    metadata,
    # LoRA adapters added at run time (POST /api/adapters), so a restarted gateway serves them again; those in
    # the config file are not here (the file is their record)
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)
