"""Alembic's environment: runs the revisions on the connection the store hands over (online only).

The store opens its own async engine and calls Alembic through ``Connection.run_sync``; this file takes
that connection from ``config.attributes["connection"]`` and never builds an engine or reads an .ini.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from memserve.store.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "memserve's migrations run inside memserve.store (Store.open), which passes them a connection; "
        "the alembic command line is not supported"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things: later revisions rebuild tables in batch mode
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
