"""The one database: SQLite in the data folder by default, Postgres when ``database_url`` names one.

``Store.open`` makes the database usable or refuses with a StoreUnavailable that says why: it creates a
new SQLite file (never over an existing one it cannot read), sets WAL and a busy timeout on every
connection, migrates to the newest revision and checks the result. Keys and usage hang off it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from memserve.errors import StoreUnavailable
from memserve.store import migrate
from memserve.store.adapters import AdapterStore
from memserve.store.batches import BatchStore
from memserve.store.faults import Target, corrupt_message, translated
from memserve.store.keys import KeyStore
from memserve.store.schema import metadata
from memserve.store.usage import UsageLog

SQLITE_HEADER = b"SQLite format 3\x00"
_PG_MIGRATION_LOCK = 0x6D656D73  # "mems": one gateway migrates at a time, the others wait for it


def database_url(configured: str | None, data_dir: Path) -> str:
    """The async SQLAlchemy URL: the configured one with its async driver, else SQLite in ``data_dir``."""
    if not configured:
        return f"sqlite+aiosqlite:///{Path(data_dir).expanduser() / 'memserve.db'}"
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if configured.startswith(plain):
            return driver + configured[len(plain) :]
    return configured


def utcnow() -> datetime:
    return datetime.now(UTC)


class Store:
    """An open database: ``keys`` (issued API keys), ``usage`` (one row per request) and ``batches`` (files and
    batch jobs)."""

    def __init__(
        self, engine: AsyncEngine, target: Target, keys: KeyStore, usage: UsageLog, batches: BatchStore | None = None
    ) -> None:
        self.engine = engine
        self.target = target
        self.keys = keys
        self.usage = usage
        self.batches = batches or BatchStore(engine, target, clock=utcnow)
        self.adapters = AdapterStore(engine, target, clock=utcnow)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        busy_timeout_seconds: float = 5.0,
        key_cache_seconds: float = 5.0,
        flush_seconds: float = 1.0,
        batch_rows: int = 500,
        max_pending_rows: int = 100_000,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> Store:
        """Open (creating a SQLite file on first start), migrate to head and check the schema.

        The usage flusher is not started here (a CLI command needs none): the gateway calls
        ``store.usage.start()``. ``clock`` (UTC now) and ``monotonic`` are seams for tests.
        """
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StoreUnavailable(
                f"database_url {url!r} is not a database URL: use sqlite:///PATH or postgresql://USER@HOST/DB."
            ) from exc
        target = Target.of(parsed, busy_timeout_seconds)
        if parsed.get_backend_name() == "sqlite":
            _prepare_sqlite_file(parsed)
            engine = _sqlite_engine(parsed, busy_timeout_seconds)
        elif parsed.get_backend_name() == "postgresql":
            engine = create_async_engine(
                parsed.set(drivername="postgresql+asyncpg"),
                pool_pre_ping=True,
                connect_args={"timeout": busy_timeout_seconds, "server_settings": {"application_name": "memserve"}},
            )
        else:
            raise StoreUnavailable(
                f"database_url {target.label!r} names {parsed.get_backend_name()!r}: memserve speaks SQLite "
                "(sqlite:///PATH) and Postgres (postgresql://USER@HOST/DB)."
            )
        try:
            await _migrate_once(engine, parsed, target, busy_timeout_seconds)
        except BaseException:
            await engine.dispose()
            raise
        keys = KeyStore(engine, target, clock=clock, cache_seconds=key_cache_seconds, monotonic=monotonic)
        usage = UsageLog(
            engine,
            target,
            flush_seconds=flush_seconds,
            batch_rows=batch_rows,
            max_pending_rows=max_pending_rows,
            after_flush=keys.write_last_used,
        )
        return cls(engine, target, keys, usage, BatchStore(engine, target, clock=clock))

    async def close(self) -> None:
        """Flush what usage holds (SIGTERM loses no row), then close every connection."""
        try:
            await self.usage.close()
            await self.keys.write_last_used()
        except StoreUnavailable:
            pass  # usage.close logged what it could not write; last_used_at is only a hint
        finally:
            await self.engine.dispose()


def _prepare_sqlite_file(url: URL) -> None:
    """Create the folder; refuse a read-only place or a file that is not SQLite before SQLite sees it."""
    if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
        raise StoreUnavailable(
            f"database_url {url.render_as_string()!r} names no file: memserve keeps keys and usage in a file "
            "(sqlite:///PATH/memserve.db)."
        )
    path = Path(url.database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(
            f"Cannot create the folder {path.parent} for the database {path} ({exc.strerror}). "
            "Create it with write access for this user, or set database_url to another place."
        ) from exc
    if not os.access(path.parent, os.W_OK | os.X_OK, effective_ids=True):
        raise StoreUnavailable(
            f"The folder {path.parent} is read-only for this user, so the database {path} cannot be "
            "created or written (SQLite writes -wal and -shm files next to it). Make it writable, or set "
            "database_url to another place."
        )
    if not path.exists():
        return
    if not os.access(path, os.R_OK | os.W_OK, effective_ids=True):
        raise StoreUnavailable(
            f"The database {path} is read-only (or unreadable) for this user. Make it writable "
            f"(chmod u+rw {path}), or set database_url to another place."
        )
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StoreUnavailable(f"Cannot read the database {path} ({exc.strerror}).") from exc
    if header and header != SQLITE_HEADER:  # an empty file is an empty database; anything else must be SQLite
        raise StoreUnavailable(corrupt_message(str(path)))


def _sqlite_engine(url: URL, busy_timeout_seconds: float, *, write_lock: bool = False) -> AsyncEngine:
    """The SQLite engine; with ``write_lock``, every transaction starts with ``BEGIN IMMEDIATE``.

    Python's sqlite3 (legacy transaction control, before 3.16) runs DDL outside any transaction, so two
    processes migrating one fresh file both see no schema and the second fails on "table already exists".
    The migration engine therefore takes SQLite's transaction control over as SQLAlchemy's SQLite docs show
    ("Enabling Non-Legacy SQLite Transactional Modes": ``isolation_level = None`` and our own BEGIN), and
    begins IMMEDIATE: the write lock is taken before the revision is read, and a second process waits for it
    (``busy_timeout``), then finds the schema at head.
    """
    engine = create_async_engine(
        url.set(drivername="sqlite+aiosqlite"),
        connect_args={"timeout": busy_timeout_seconds},
        poolclass=NullPool if write_lock else None,
    )
    busy_ms = int(busy_timeout_seconds * 1000)

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a crash of the process loses nothing
        finally:
            cursor.close()
        if write_lock:
            dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own; the hook below does

    if write_lock:

        @sa.event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


async def _migrate_once(engine: AsyncEngine, url: URL, target: Target, busy_timeout_seconds: float) -> None:
    """Migrate holding a lock every process opening this database shares, so that gateways started together
    on a fresh database upgrade it once, one after the other: Postgres's advisory lock (in ``_migrate``),
    SQLite's write lock (a short-lived engine whose transaction is ``BEGIN IMMEDIATE``)."""
    migrating = engine
    if url.get_backend_name() == "sqlite":
        migrating = _sqlite_engine(url, busy_timeout_seconds, write_lock=True)
    try:
        with translated(target):
            async with migrating.begin() as conn:
                await conn.run_sync(_migrate, target)
    finally:
        if migrating is not engine:
            await migrating.dispose()


def _migrate(conn: Connection, target: Target) -> None:
    if conn.dialect.name == "postgresql":
        # held until this transaction ends; Postgres's DDL is transactional, so the next holder sees head
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
    found = migrate.current(conn)
    head = migrate.head()
    if found is not None and found not in migrate.known_revisions():
        raise StoreUnavailable(
            f"The database {target.label} has schema revision {found}, newer than this memserve knows "
            f"(its newest is {head}): a newer memserve wrote it. Upgrade memserve, or point database_url "
            "at another database; memserve never downgrades a schema."
        )
    migrate.upgrade(conn)
    _check_schema(conn, target)


def _check_schema(conn: Connection, target: Target) -> None:
    """After migrating: every table and column the queries use is there (a hand-edited schema is refused)."""
    if migrate.current(conn) != migrate.head():
        raise StoreUnavailable(
            f"The database {target.label} did not reach schema revision {migrate.head()} after migrating."
        )
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            raise StoreUnavailable(
                f"The database {target.label} is at revision {migrate.head()} but has no table {table.name!r}: "
                "it was changed by hand. Restore it from a backup or point database_url at a fresh database."
            )
        have = {column["name"] for column in inspector.get_columns(table.name)}
        missing = sorted(set(table.columns.keys()) - have)
        if missing:
            raise StoreUnavailable(
                f"The database {target.label}: table {table.name!r} lacks the columns {', '.join(missing)} "
                "that this revision has: it was changed by hand. Restore it from a backup."
            )
