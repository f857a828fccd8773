"""Usage: buffered records, batched writes, exact limit counts, summaries, close, and write faults."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from memserve.errors import InvalidArgument, StoreUnavailable
from memserve.store import Store, UsageLog
from memserve.store.usage import _CommitGate

from .helpers import T0, LockHolder, row

T = TypeVar("T")


def on_store(url: str, work: Callable[[Store], Awaitable[T]], **options: Any) -> T:
    async def run() -> T:
        store = await Store.open(url, **options)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the flusher to do its work: it is a background task, so the test yields until it has."""
    for _ in range(3000):  # a bound on a liveness check only; the assertions never depend on timing
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the usage flusher did not write the rows")


SAMPLE = [
    row(time=T0, key_id="k1", key_name="alice", end_user="u1", model="a", prompt_tokens=10, completion_tokens=5),
    row(time=T0, key_id="k1", key_name="alice", end_user="u2", model="b", prompt_tokens=20, completion_tokens=0,
        status=500, error_type="runner_failed", ttft_seconds=None, duration_seconds=3.0),
    row(time=T0 + timedelta(minutes=2), key_id="k2", key_name="bob", end_user="u1", model="a", prompt_tokens=1,
        completion_tokens=1, ttft_seconds=0.3, duration_seconds=2.0),
    row(time=T0 + timedelta(minutes=2), key_id=None, key_name=None, end_user=None, model="a", prompt_tokens=100,
        completion_tokens=100, status=429, error_type="rate_limit_exceeded", provider="openai"),
]  # fmt: skip


def test_summary_by_key_user_model_and_utc_day(db_url: str) -> None:
    async def work(store: Store) -> dict[str, list[dict[str, Any]]]:
        for r in SAMPLE:
            store.usage.record(r)
        assert await store.usage.flush() == 4
        return {g: await store.usage.summary(g, None, None) for g in ("key", "user", "model", "day")}  # type: ignore[arg-type]

    out = on_store(db_url, work)

    def stats(requests: int, prompt: int, completion: int, errors: int, ttft: float | None, duration: float) -> dict:
        return {
            "requests": requests,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "errors": errors,
            "avg_ttft_seconds": ttft,
            "avg_duration_seconds": duration,
        }

    def close(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows]

    assert close(out["key"]) == [
        {"key_id": None, "key_name": None, **stats(1, 100, 100, 1, 0.1, 1.0)},
        {"key_id": "k1", "key_name": "alice", **stats(2, 30, 5, 1, 0.1, 2.0)},
        {"key_id": "k2", "key_name": "bob", **stats(1, 1, 1, 0, 0.3, 2.0)},
    ]
    assert close(out["user"]) == [
        {"end_user": None, **stats(1, 100, 100, 1, 0.1, 1.0)},
        {"end_user": "u2", **stats(1, 20, 0, 1, None, 3.0)},
        {"end_user": "u1", **stats(2, 11, 6, 0, 0.2, 1.5)},
    ]
    assert close(out["model"]) == [
        {"model": "a", **stats(3, 111, 106, 1, 0.166667, 1.333333)},
        {"model": "b", **stats(1, 20, 0, 1, None, 3.0)},
    ]
    assert close(out["day"]) == [  # T0 is 23:59 UTC on March 14: the last two rows are on the 15th
        {"day": "2026-03-14", **stats(2, 30, 5, 1, 0.1, 2.0)},
        {"day": "2026-03-15", **stats(2, 101, 101, 1, 0.2, 1.5)},
    ]


def test_summary_filters_by_time_range_and_key(db_url: str) -> None:
    async def work(store: Store) -> list[list[dict[str, Any]]]:
        for r in SAMPLE:
            store.usage.record(r)
        await store.usage.flush()
        later = T0 + timedelta(minutes=2)
        return [
            await store.usage.summary("model", later, None),
            await store.usage.summary("model", None, later),
            await store.usage.summary("model", T0, later, key_id="k1"),
            await store.usage.summary("model", T0 + timedelta(days=9), None),
        ]

    since, until, k1, empty = on_store(db_url, work)
    assert [(r["model"], r["requests"]) for r in since] == [("a", 2)]
    assert [(r["model"], r["requests"]) for r in until] == [("b", 1), ("a", 1)]
    assert [(r["model"], r["requests"]) for r in k1] == [("b", 1), ("a", 1)]
    assert empty == []


def test_summary_refuses_an_unknown_grouping(sqlite_url: str) -> None:
    async def work(store: Store) -> None:
        await store.usage.summary("week", None, None)  # type: ignore[arg-type]

    with pytest.raises(InvalidArgument, match="group_by must be one of key, user, model, day") as caught:
        on_store(sqlite_url, work)
    assert caught.value.param == "group_by"


def test_limit_counts_include_the_rows_not_yet_written(db_url: str) -> None:
    async def work(store: Store) -> list[tuple[int, int]]:
        seen = []
        store.usage.record(row(time=T0 - timedelta(seconds=1)))  # before the window
        store.usage.record(row(time=T0, key_id="other"))  # another key
        for i in range(3):
            store.usage.record(row(time=T0 + timedelta(seconds=i), prompt_tokens=10, completion_tokens=5))
        seen.append((await store.usage.tokens_since("k1", T0), await store.usage.requests_since("k1", T0)))
        await store.usage.flush()
        seen.append((await store.usage.tokens_since("k1", T0), await store.usage.requests_since("k1", T0)))
        store.usage.record(row(time=T0 + timedelta(seconds=9), prompt_tokens=1, completion_tokens=1))
        seen.append((await store.usage.tokens_since("k1", T0), await store.usage.requests_since("k1", T0)))
        seen.append((await store.usage.tokens_since("nobody", T0), await store.usage.requests_since("nobody", T0)))
        return seen

    assert on_store(db_url, work) == [(45, 3), (45, 3), (47, 4), (0, 0)]


def test_limit_counts_stay_exact_while_the_flusher_writes(db_url: str) -> None:
    """Every count equals what was recorded, whatever the flusher was doing when it ran."""

    async def work(store: Store) -> list[tuple[int, int, int, int]]:
        rng = random.Random(13)
        store.usage.start(flush_seconds=0.001)
        store.usage.batch_rows = 3
        recorded = tokens = 0
        mismatches = []
        for i in range(300):
            for _ in range(rng.randint(0, 4)):
                store.usage.record(row(time=T0, prompt_tokens=i, completion_tokens=1))
                recorded += 1
                tokens += i + 1
            if rng.random() < 0.3:
                await asyncio.sleep(0)  # let the flusher start a write here and there
            got_tokens = await store.usage.tokens_since("k1", T0)
            got_requests = await store.usage.requests_since("k1", T0)
            if (got_tokens, got_requests) != (tokens, recorded):
                mismatches.append((got_tokens, tokens, got_requests, recorded))
        assert store.usage.flushed_rows > 0  # the flusher did write while counting
        return mismatches

    assert on_store(db_url, work) == []


def test_a_commit_waits_for_running_readers_and_readers_wait_for_a_commit() -> None:
    async def scenario() -> list[str]:
        gate, events = _CommitGate(), []
        reader_in, reader_go = asyncio.Event(), asyncio.Event()

        async def reader(name: str, hold: asyncio.Event | None = None) -> None:
            async with gate.reading():
                events.append(f"{name} reads")
                if hold is not None:
                    reader_in.set()
                    await hold.wait()
            events.append(f"{name} done")

        async def commit() -> None:
            async with gate.committing():
                events.append("commit")
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            events.append("commit done")

        first = asyncio.create_task(reader("r1", reader_go))
        await reader_in.wait()
        committing = asyncio.create_task(commit())
        await asyncio.sleep(0)
        late = asyncio.create_task(reader("r2"))
        await asyncio.sleep(0)
        events.append("release r1")
        reader_go.set()
        await asyncio.gather(first, committing, late)
        return events

    assert asyncio.run(scenario()) == [
        "r1 reads",
        "release r1",
        "r1 done",
        "commit",
        "commit done",
        "r2 reads",
        "r2 done",
    ]


def test_a_row_the_database_refuses_is_dropped_alone_and_never_holds_the_others_back(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Text that is not UTF-8 (a lone surrogate from a client's JSON escape), or on Postgres a number past an
    INTEGER column: the database refuses the row whatever is retried. Before, such a row was put back at the
    front of the buffer each time, and every row behind it was kept until shutdown, then lost."""
    bad = [row(model="\ud800"), row(end_user="x\udfff")]
    if not db_url.startswith("sqlite"):
        bad.append(row(prompt_tokens=2**40))  # SQLite's INTEGER holds it
    good = [row(time=T0 + timedelta(seconds=i), model=f"m{i}") for i in range(97)]
    rows = good[:3] + bad[:1] + good[3:50] + bad[1:] + good[50:]

    async def work(store: Store) -> tuple[int, int, dict[str, Any], int]:
        for r in rows:
            store.usage.record(r)
        written = await store.usage.flush()
        health = store.usage.health()
        store.usage.record(row(model="after"))
        after = await store.usage.flush()
        return written, store.usage.lost_rows, health, after

    with caplog.at_level(logging.ERROR, logger="memserve.store"):
        written, lost, health, after = on_store(db_url, work)
    assert (written, lost, after) == (len(good), len(bad), 1)
    assert health == {"pending_rows": 0, "lost_rows": len(bad), "last_error": None}
    refused = [r.getMessage() for r in caplog.records if "refused by the database" in r.getMessage()]
    assert len(refused) == len(bad), refused

    async def models(store: Store) -> set[str]:
        return {g["model"] for g in await store.usage.summary("model", None, None)}

    assert on_store(db_url, models) == {r.model for r in good} | {"after"}


def test_close_writes_every_buffered_row(db_url: str) -> None:
    async def fill(store: Store) -> None:
        store.usage.start(flush_seconds=3600)  # only close will write
        for i in range(1234):
            store.usage.record(row(time=T0 + timedelta(microseconds=i)))

    async def count(store: Store) -> int:
        return (await store.usage.summary("key", None, None))[0]["requests"]

    on_store(db_url, fill, batch_rows=10**6)
    assert on_store(db_url, count) == 1234


def test_close_during_a_write_writes_every_row_once(db_url: str) -> None:
    async def fill(store: Store) -> None:
        store.usage.start()
        for i in range(5000):
            store.usage.record(row(time=T0 + timedelta(microseconds=i)))
        while store.usage.health()["pending_rows"] == 5000 and not store.usage._inflight:
            await asyncio.sleep(0)  # until the flusher has taken the rows: close() then meets a write in flight
        await store.usage.close()

    async def count(store: Store) -> tuple[int, int]:
        async with store.engine.connect() as conn:
            rows = (await conn.exec_driver_sql("SELECT count(*), count(DISTINCT time) FROM usage")).one()
        return rows[0], rows[1]

    on_store(db_url, fill, batch_rows=500)
    assert on_store(db_url, count) == (5000, 5000)


def test_the_flusher_writes_a_full_batch_at_once_and_the_rest_each_interval(sqlite_url: str) -> None:
    async def work(store: Store) -> list[int]:
        store.usage.start(flush_seconds=3600)
        for _ in range(store.usage.batch_rows):
            store.usage.record(row())
        await until(lambda: store.usage.flushed_rows == 5)
        store.usage.start(flush_seconds=0.01)  # already running: only the interval changes
        store.usage.record(row())
        await until(lambda: store.usage.flushed_rows == 6)
        return store.usage.flush_sizes

    sizes = on_store(sqlite_url, work, batch_rows=5)
    assert sum(sizes) == 6 and sizes[0] == 5


def test_record_never_awaits_and_after_close_counts_the_row_as_lost(sqlite_url: str) -> None:
    assert not inspect.iscoroutinefunction(UsageLog.record)

    async def work(store: Store) -> dict[str, Any]:
        await store.usage.close()
        store.usage.record(row())
        return store.usage.health()

    assert on_store(sqlite_url, work) == {"pending_rows": 0, "lost_rows": 1, "last_error": None}


def test_a_row_needs_an_aware_time() -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        row(time=datetime(2026, 1, 1))


def _limit_size(store: Store, pages: int | None) -> Callable[[Any, Any], None]:
    """Cap the SQLite file at ``pages`` pages (None: lift the cap) on every new connection: a full disk."""
    sql = f"PRAGMA max_page_count = {pages if pages is not None else 1073741823}"

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(sql)
        cursor.close()

    sa.event.listen(store.engine.sync_engine, "connect", on_connect)
    return on_connect


def test_a_full_disk_keeps_the_rows_up_to_the_bound_then_drops_the_oldest(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def work(store: Store) -> list[Any]:
        async with store.engine.connect() as conn:
            pages = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
        cap = _limit_size(store, pages)
        await store.engine.dispose()
        seen: list[Any] = []
        big = "x" * 20_000  # one row wider than a page: it cannot fit
        for i in range(3):
            store.usage.record(row(prompt_tokens=i, model=big))
        with pytest.raises(StoreUnavailable, match="is full"):
            await store.usage.flush()
        seen.append(store.usage.health())
        for i in range(3, 8):
            store.usage.record(row(prompt_tokens=i, model=big))
        with pytest.raises(StoreUnavailable):
            await store.usage.flush()
        seen.append(store.usage.health())
        sa.event.remove(store.engine.sync_engine, "connect", cap)
        await store.engine.dispose()
        _limit_size(store, None)
        await store.usage.flush()
        seen.append(store.usage.health())
        async with store.engine.connect() as conn:
            seen.append(list((await conn.exec_driver_sql("SELECT prompt_tokens FROM usage ORDER BY id")).scalars()))
        return seen

    with caplog.at_level(logging.WARNING, logger="memserve.store"):
        first, second, recovered, kept = on_store(sqlite_url, work, max_pending_rows=5)
    assert first["pending_rows"] == 3 and first["lost_rows"] == 0 and "is full" in first["last_error"]
    assert second["pending_rows"] == 5 and second["lost_rows"] == 3
    assert recovered == {"pending_rows": 0, "lost_rows": 3, "last_error": None}
    assert kept == [3, 4, 5, 6, 7]  # the newest five
    failures = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(failures) == 1  # once per failure streak
    assert any("written again (3 lost" in r.getMessage() for r in caplog.records)


def test_a_database_locked_by_another_process_keeps_the_rows_for_the_next_write(tmp_path: Path) -> None:
    from memserve.store import database_url

    url = database_url(None, tmp_path)

    async def work(store: Store) -> list[Any]:
        store.usage.record(row())
        holder = LockHolder(tmp_path / "memserve.db", "WAL")
        try:
            with pytest.raises(StoreUnavailable, match="is locked by another process"):
                await store.usage.flush()
            during = store.usage.health()
        finally:
            holder.release()
        written = await store.usage.flush()
        return [during, written, store.usage.health()]

    during, written, after = on_store(url, work, busy_timeout_seconds=0.2)
    assert during["pending_rows"] == 1 and "locked" in during["last_error"]
    assert written == 1 and after == {"pending_rows": 0, "lost_rows": 0, "last_error": None}


def test_a_postgres_that_goes_away_keeps_the_rows_for_the_next_write(postgres_server: Any, tmp_path: Path) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    from memserve.store import database_url

    url = database_url(postgres_server.new_database(), tmp_path)
    name = make_url(url).database

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=str(postgres_server.socket_dir), user="postgres", database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def work(store: Store) -> list[Any]:
        store.usage.record(row())
        await store.usage.tokens_since("k1", T0)  # a pooled connection, about to die
        await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        try:
            with pytest.raises(StoreUnavailable, match="Postgres"):
                await store.usage.flush()
            during = store.usage.health()
        finally:
            await admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        return [during, await store.usage.flush(), store.usage.health(), await store.usage.tokens_since("k1", T0)]

    during, written, after, tokens = on_store(url, work, busy_timeout_seconds=2.0)
    assert during["pending_rows"] == 1 and during["lost_rows"] == 0 and "postgres" in during["last_error"].lower()
    assert "://postgres@/" in during["last_error"]
    assert (written, after, tokens) == (1, {"pending_rows": 0, "lost_rows": 0, "last_error": None}, 15)
