"""Migrations: from an empty database, from the previous revision with data in it, and matching schema.py."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from memserve.store import Store, UsageRow
from memserve.store import migrate as migrations
from memserve.store.batches import BatchStore
from memserve.store.faults import Target
from memserve.store.keys import KeyStore
from memserve.store.schema import metadata


def test_revisions_are_one_line_oldest_first_and_named_by_their_id() -> None:
    scripts = list(reversed(list(migrations.scripts().walk_revisions())))
    assert [s.revision for s in scripts] == ["0001", "0002", "0003", "0004", "0005"]
    assert [s.down_revision for s in scripts] == [None, "0001", "0002", "0003", "0004"]
    for script in scripts:
        assert re.fullmatch(rf"{script.revision}_[a-z_]+\.py", script.path.rsplit("/", 1)[-1])
    assert migrations.head() == "0005"


def _differences(connection: sa.Connection) -> list[Any]:
    return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)


def test_upgrade_from_empty_gives_exactly_the_tables_the_queries_use(db_url: str) -> None:
    async def upgraded() -> tuple[list[Any], set[str]]:
        store = await Store.open(db_url)
        try:
            async with store.engine.connect() as conn:
                diffs = await conn.run_sync(_differences)
                tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
            return diffs, tables
        finally:
            await store.close()

    diffs, tables = asyncio.run(upgraded())
    assert diffs == []
    assert tables == {
        "alembic_version",
        "api_keys",
        "usage",
        "files",
        "file_parts",
        "batches",
        "batch_results",
        "adapters",
    }


def test_upgrade_from_0001_keeps_the_keys_and_they_still_work(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).parent.mkdir(parents=True)

    async def at_0001() -> tuple[str, str]:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(migrations.upgrade, "0001")
                assert await conn.run_sync(migrations.current) == "0001"
                tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
                assert "usage" not in tables
            keys = KeyStore(engine, Target.of(url, 5.0), clock=lambda: datetime.now(UTC))
            key, secret = await keys.create("before-upgrade", models=["demo"], rpm=7, admin=True)
            return key.id, secret
        finally:
            await engine.dispose()

    key_id, secret = asyncio.run(at_0001())

    async def after_upgrade() -> tuple[Any, ...]:
        store = await Store.open(db_url)
        try:
            key = await store.keys.verify(secret)
            store.usage.record(
                UsageRow(
                    time=datetime.now(UTC),
                    key_id=key.id,
                    key_name=key.name,
                    model="demo",
                    provider="local",
                    endpoint="/v1/completions",
                    prompt_tokens=3,
                    completion_tokens=4,
                    duration_seconds=0.5,
                    status=200,
                )
            )
            await store.usage.flush()
            summary = await store.usage.summary("key", None, None)
            return key.id, key.name, key.models, key.rpm, key.admin, summary[0]["requests"]
        finally:
            await store.close()

    assert asyncio.run(after_upgrade()) == (key_id, "before-upgrade", ("demo",), 7, True, 1)


def test_upgrade_from_0002_counts_the_rows_it_had_as_admitted(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).parent.mkdir(parents=True)
    at = datetime.now(UTC)

    async def at_0002() -> None:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(migrations.upgrade, "0002")
                row = {
                    "time": at.replace(tzinfo=None),
                    "key_id": "k1",
                    "model": "demo",
                    "provider": "local",
                    "endpoint": "/v1/completions",
                    "prompt_tokens": 3,
                    "completion_tokens": 4,
                    "duration_seconds": 0.5,
                    "status": 200,
                    "fallback": False,
                }
                columns = ", ".join(row)
                await conn.execute(sa.text(f"INSERT INTO usage ({columns}) VALUES (:{', :'.join(row)})"), row)
        finally:
            await engine.dispose()

    asyncio.run(at_0002())

    async def after_upgrade() -> tuple[int, int]:
        store = await Store.open(db_url)
        try:
            since = at - timedelta(seconds=1)
            return await store.usage.requests_since("k1", since), await store.usage.tokens_since("k1", since)
        finally:
            await store.close()

    assert asyncio.run(after_upgrade()) == (1, 7)


def test_upgrade_from_0003_keeps_keys_and_usage_and_adds_the_batch_tables(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).parent.mkdir(parents=True)

    async def at_0003() -> str:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(migrations.upgrade, "0003")
                tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
                assert "batches" not in tables and "files" not in tables
            keys = KeyStore(engine, Target.of(url, 5.0), clock=lambda: datetime.now(UTC))
            _key, secret = await keys.create("before-batches")
            return secret
        finally:
            await engine.dispose()

    secret = asyncio.run(at_0003())

    async def after_upgrade() -> tuple[str, str, bool, bool, int]:
        store = await Store.open(db_url)
        try:
            key = await store.keys.verify(secret)
            stored = await store.batches.create_file(
                "file-1", purpose="batch", filename="in.jsonl", key_id=key.id, parts=[b"a\n", b"b\n"]
            )
            batch = await store.batches.create_batch(
                "batch_1",
                endpoint="/v1/completions",
                input_file_id=stored.id,
                completion_window=timedelta(hours=24),
                window_text="24h",
                key_id=key.id,
                key_name=key.name,
                metadata=None,
            )
            first = await store.batches.record_result(batch.id, "q1", line=1, ok=True, record={"x": 1})
            again = await store.batches.record_result(batch.id, "q1", line=1, ok=True, record={"x": 1})
            content = b"".join([part async for part in store.batches.content(stored.id)])
            counted = await store.batches.get_batch(batch.id)
            assert counted is not None
            return key.name, content.decode(), first, again, counted.completed
        finally:
            await store.close()

    assert asyncio.run(after_upgrade()) == ("before-batches", "a\nb\n", True, False, 1)


def test_upgrade_from_0004_keeps_the_batches_and_adds_the_adapters(db_url: str) -> None:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).parent.mkdir(parents=True)

    async def at_0004() -> None:
        engine = create_async_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(migrations.upgrade, "0004")
                assert "adapters" not in set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
            batches = BatchStore(engine, Target.of(url, 5.0), clock=lambda: datetime.now(UTC))
            await batches.create_file("file-1", purpose="batch", filename="in.jsonl", key_id=None, parts=[b"a\n"])
        finally:
            await engine.dispose()

    asyncio.run(at_0004())

    async def after_upgrade() -> tuple[str, list[tuple[str, str, str]]]:
        store = await Store.open(db_url)
        try:
            content = b"".join([part async for part in store.batches.content("file-1")])
            await store.adapters.put("support", "tiny", "/lora/support")
            await store.adapters.put("legal", "tiny", "/lora/legal")
            await store.adapters.put("support", "tiny", "/lora/support-v2")  # the same name again: replaced
            await store.adapters.remove("legal")
            return content.decode(), [(a.name, a.model, a.source) for a in await store.adapters.list()]
        finally:
            await store.close()

    assert asyncio.run(after_upgrade()) == ("a\n", [("support", "tiny", "/lora/support-v2")])
