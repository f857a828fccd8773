"""Opening the store: the URL, the SQLite file and its pragmas, and each fault at open."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from memserve.errors import StoreUnavailable
from memserve.store import Store, database_url
from memserve.store import migrate as migrations

from .helpers import LockHolder, unprivileged


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        (None, "sqlite+aiosqlite:////data/memserve.db"),
        ("", "sqlite+aiosqlite:////data/memserve.db"),
        ("postgresql://u:p@db:5432/memserve", "postgresql+asyncpg://u:p@db:5432/memserve"),
        ("postgres://u@db/memserve", "postgresql+asyncpg://u@db/memserve"),
        ("postgresql+asyncpg://u@db/m", "postgresql+asyncpg://u@db/m"),
        ("sqlite:////var/lib/memserve/x.db", "sqlite+aiosqlite:////var/lib/memserve/x.db"),
        ("sqlite+aiosqlite:///rel.db", "sqlite+aiosqlite:///rel.db"),
    ],
)
def test_database_url(configured: str | None, expected: str) -> None:
    assert database_url(configured, Path("/data")) == expected


def test_first_open_creates_the_folder_and_file_in_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "memserve.db"

    async def check() -> tuple[str, int, str | None]:
        store = await Store.open(database_url(f"sqlite:///{path}", tmp_path), busy_timeout_seconds=2.5)
        try:
            async with store.engine.connect() as conn:
                mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
                busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
                revision = await conn.run_sync(migrations.current)
            return mode, busy, revision
        finally:
            await store.close()

    assert asyncio.run(check()) == ("wal", 2500, migrations.head())
    assert path.is_file()


def test_open_twice_is_a_no_op(db_url: str) -> None:
    async def twice() -> tuple[list[str], list[str]]:
        first = await Store.open(db_url)
        try:
            await first.keys.create("alice")
        finally:
            await first.close()
        second = await Store.open(db_url)
        try:
            async with second.engine.connect() as conn:
                versions = list((await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalars())
            return versions, [k.name for k in await second.keys.list()]
        finally:
            await second.close()

    assert asyncio.run(twice()) == ([migrations.head()], ["alice"])


# Each child imports the store, says "ready", waits for "go" on stdin, then opens: all open at one instant.
_OPEN_ON_GO = """
import asyncio, sys
from memserve.store import Store
from memserve.store import migrate


async def main() -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    store = await Store.open(sys.argv[1])
    try:
        async with store.engine.connect() as conn:
            print(await conn.run_sync(migrate.current), flush=True)
    finally:
        await store.close()


asyncio.run(main())
"""


def test_gateways_starting_together_on_a_fresh_database_all_open_and_migrate_it_once(db_url: str) -> None:
    """Without a lock around the upgrade, every process saw no schema and all but one failed on "table already
    exists" (SQLite runs DDL outside a transaction; measured: 6 of 8 pairs failed)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_ON_GO, db_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [(child.returncode, out, err) for child, (out, err) in zip(children, answers, strict=True)] == [
        (0, f"{migrations.head()}\n", "")
    ] * 3

    async def versions() -> list[str]:
        store = await Store.open(db_url)
        try:
            async with store.engine.connect() as conn:
                return list((await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalars())
        finally:
            await store.close()

    assert asyncio.run(versions()) == [migrations.head()]


def _open_fails(url: str, **kwargs: float) -> str:
    async def attempt() -> None:
        store = await Store.open(url, **kwargs)
        await store.close()

    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(attempt())
    assert caught.value.status_code == 503
    return caught.value.message


def test_a_read_only_folder_is_refused_naming_it(shared_dir: Path) -> None:
    folder = shared_dir / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    path = folder / "memserve.db"
    with unprivileged():
        message = _open_fails(database_url(f"sqlite:///{path}", shared_dir))
    assert str(folder) in message and "read-only" in message and "database_url" in message
    assert not path.exists()


def test_a_folder_that_cannot_be_created_is_refused(shared_dir: Path) -> None:
    shared_dir.joinpath("ro").mkdir()
    shared_dir.joinpath("ro").chmod(0o555)
    path = shared_dir / "ro" / "sub" / "memserve.db"
    with unprivileged():
        message = _open_fails(database_url(f"sqlite:///{path}", shared_dir))
    assert f"Cannot create the folder {path.parent}" in message


def test_a_read_only_file_is_refused_naming_it(shared_dir: Path) -> None:
    url = database_url(None, shared_dir)
    asyncio.run(_open_and_close(url))
    path = shared_dir / "memserve.db"
    path.chmod(0o444)
    with unprivileged():
        message = _open_fails(url)
    assert f"The database {path} is read-only" in message and "chmod" in message


async def _open_and_close(url: str) -> None:
    store = await Store.open(url)
    await store.close()


@pytest.mark.parametrize(
    "content",
    [b"not a database, some notes someone saved here\n" * 50, b"SQLite format 3\x00" + bytes(range(256)) * 20],
    ids=["text", "garbled-after-header"],
)
def test_a_corrupt_file_is_refused_and_never_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "memserve.db"
    path.write_bytes(content)
    message = _open_fails(database_url(None, tmp_path))
    assert f"{path} is not a SQLite database, or it is corrupt" in message and "never replaces" in message
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) in (["memserve.db"], ["memserve.db", "memserve.db-journal"])


def test_a_database_locked_by_another_process_is_refused_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "memserve.db"
    holder = LockHolder(path, "DELETE")
    try:
        message = _open_fails(database_url(None, tmp_path), busy_timeout_seconds=0.2)
    finally:
        holder.release()
    assert f"The database {path} is locked by another process" in message and "0.2 s" in message
    asyncio.run(_open_and_close(database_url(None, tmp_path)))  # once released, it opens


def test_a_schema_newer_than_this_version_is_refused(db_url: str) -> None:
    async def stamp_future() -> None:
        store = await Store.open(db_url)
        try:
            async with store.engine.begin() as conn:
                await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
            await store.keys.create("kept")
        finally:
            await store.close()

    asyncio.run(stamp_future())
    message = _open_fails(db_url)
    assert "schema revision 0099, newer than this memserve knows" in message
    assert f"its newest is {migrations.head()}" in message and "never downgrades" in message


def test_an_unreachable_postgres_is_refused_naming_it(tmp_path: Path) -> None:
    url = database_url(f"postgresql://memserve:hunter2@/memserve?host={tmp_path}/nothing-listens", tmp_path)
    message = _open_fails(url, busy_timeout_seconds=1.0)
    assert "Cannot reach the Postgres server at postgresql+asyncpg://memserve:***@/memserve" in message
    assert "hunter2" not in message


def test_a_missing_postgres_database_is_refused_naming_it(postgres_server: object, tmp_path: Path) -> None:
    from tests.postgres import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    message = _open_fails(database_url(postgres_server.url("no_such_db"), tmp_path))
    assert 'database "no_such_db" does not exist' in message and "createdb" in message


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "mysql://u@h/db", "not a url at all"])
def test_urls_the_store_cannot_use_are_refused(url: str, tmp_path: Path) -> None:
    message = _open_fails(database_url(url, tmp_path))
    assert "database_url" in message


def test_the_store_imports_no_torch_and_nothing_above_it() -> None:
    code = (
        "import sys, memserve.store, memserve.store.migrate; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith(('memserve.runner', 'memserve.gateway', 'memserve.pool', 'memserve.cli'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_public_surface() -> None:
    import memserve.store

    assert memserve.store.__all__ == ["ApiKey", "KeyStore", "Store", "UsageLog", "UsageRow", "database_url"]
    for name in memserve.store.__all__:
        assert getattr(memserve.store, name).__module__.startswith("memserve.store.")
