"""BatchStore on SQLite and Postgres: a result recorded once however often it is offered, a job held by one
gateway at a time, output files built from the results in parts, pages of files and jobs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from memserve.store import Store
from memserve.store import batches as store_batches
from memserve.store.batches import BatchStore, StoredBatch
from tests.store.conftest import db_url, postgres_server  # noqa: F401  # the store tests' backends, both

DAY = timedelta(hours=24)


async def _job(batches: BatchStore, batch_id: str = "batch_1", key_id: str | None = "k1") -> StoredBatch:
    await batches.create_file("file-in", purpose="batch", filename="in.jsonl", key_id=key_id, parts=[b"x\n"])
    return await batches.create_batch(
        batch_id,
        endpoint="/v1/completions",
        input_file_id="file-in",
        completion_window=DAY,
        window_text="24h",
        key_id=key_id,
        key_name="alice",
        metadata={"a": "b"},
    )


def test_a_result_is_recorded_and_counted_once_however_often_it_is_offered(db_url: str) -> None:  # noqa: F811
    async def run() -> tuple[list[bool], StoredBatch, set[str]]:
        store = await Store.open(db_url)
        try:
            batch = await _job(store.batches)
            offers = [
                store.batches.record_result(batch.id, "q1", line=1, ok=i % 2 == 0, record={"custom_id": "q1", "i": i})
                for i in range(8)
            ]
            recorded = list(await asyncio.gather(*offers))
            await store.batches.record_result(batch.id, "q2", line=2, ok=False, record={"custom_id": "q2"})
            found = await store.batches.get_batch(batch.id)
            assert found is not None
            return recorded, found, await store.batches.done_ids(batch.id)
        finally:
            await store.close()

    recorded, found, done = asyncio.run(run())
    assert recorded.count(True) == 1
    assert found.completed + found.failed == 2 and done == {"q1", "q2"}


def test_finish_writes_the_files_in_input_order_in_parts_and_the_status_with_them(
    db_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_batches, "PART_BYTES", 50)  # many parts, lines cut across them

    async def run() -> tuple[StoredBatch, bytes, bytes | None, StoredBatch | None]:
        store = await Store.open(db_url)
        try:
            batch = await _job(store.batches)
            for line in (5, 3, 1, 4, 2):  # recorded out of order, as concurrent requests finish
                ok = line != 4
                await store.batches.record_result(batch.id, f"q{line}", line=line, ok=ok, record={"n": line})
            await store.batches.update_batch(batch.id, status="finalizing")
            done = await store.batches.finish(
                batch.id, status="completed", stamp="completed_at", from_status=("finalizing",)
            )
            assert done is not None and done.output_file_id and done.error_file_id
            output = b"".join([p async for p in store.batches.content(done.output_file_id)])
            errors = b"".join([p async for p in store.batches.content(done.error_file_id)])
            again = await store.batches.finish(
                batch.id, status="completed", stamp="completed_at", from_status=("finalizing",)
            )
            return done, output, errors, again
        finally:
            await store.close()

    done, output, errors, again = asyncio.run(run())
    assert output == b'{"n":1}\n{"n":2}\n{"n":3}\n{"n":5}\n' and errors == b'{"n":4}\n'
    assert done.status == "completed" and done.times["completed_at"] is not None and done.holder is None
    assert again is None  # the status guard: finishing twice changes nothing
    shown = done.to_openai()
    assert shown["request_counts"] == {"total": 0, "completed": 4, "failed": 1} and shown["metadata"] == {"a": "b"}


def test_a_job_is_held_by_one_gateway_until_its_hold_runs_out_or_its_process_is_gone(db_url: str) -> None:  # noqa: F811
    async def run() -> list[bool]:
        store = await Store.open(db_url)
        try:
            batch = await _job(store.batches)
            hold = timedelta(seconds=60)
            alive = store_batches.this_holder()  # this test's own process: alive
            gone = "%s:999999999:1" % alive.split(":")[0]  # noqa: UP031  # a pid no process has
            elsewhere = "another-host:1:1"
            taken = [
                await store.batches.claim(batch.id, alive, hold),
                await store.batches.claim(batch.id, elsewhere, hold),  # held by a live process: refused
                await store.batches.claim(batch.id, alive, hold),  # renewed
            ]
            await store.batches.update_batch(batch.id, holder=gone)
            taken.append(await store.batches.claim(batch.id, elsewhere, hold))  # its holder is gone: taken over
            taken.append(await store.batches.claim(batch.id, alive, hold))  # another host's, still held
            await store.batches.update_batch(batch.id, held_until=datetime.now(UTC) - timedelta(seconds=1))
            taken.append(await store.batches.claim(batch.id, alive, hold))  # its hold ran out
            await store.batches.release(batch.id, alive)
            taken.append(await store.batches.claim(batch.id, elsewhere, hold))  # given back: free
            await store.batches.update_batch(batch.id, status="completed")
            taken.append(await store.batches.claim(batch.id, elsewhere, hold))  # finished: nothing to run
            return taken
        finally:
            await store.close()

    assert asyncio.run(run()) == [True, False, True, True, False, True, True, False]


def test_lists_page_by_creation_time_and_keep_to_a_key(db_url: str) -> None:  # noqa: F811
    moments = iter(datetime(2026, 11, 30, 12, 0, i, tzinfo=UTC) for i in range(100))

    async def run() -> tuple[list[str], bool, list[str], list[str], list[str]]:
        store = await Store.open(db_url)
        try:
            batches = BatchStore(store.engine, store.target, clock=lambda: next(moments))
            for i in range(5):
                await batches.create_file(f"file-{i}", purpose="batch", filename="f", key_id="k1", parts=[b"x"])
            await batches.create_file("file-other", purpose="batch", filename="f", key_id="k2", parts=[b"x"])
            first, more = await batches.list_files(
                key_id="k1", everyone=False, purpose=None, limit=2, after=None, newest_first=True
            )
            rest, _ = await batches.list_files(
                key_id="k1", everyone=False, purpose=None, limit=10, after=first[-1].id, newest_first=True
            )
            oldest, _ = await batches.list_files(
                key_id=None, everyone=True, purpose="batch", limit=10, after=None, newest_first=False
            )
            mine, _ = await batches.list_batches(key_id="k2", everyone=False, limit=10, after=None)
            return [f.id for f in first], more, [f.id for f in rest], [f.id for f in oldest], [b.id for b in mine]
        finally:
            await store.close()

    first, more, rest, oldest, mine = asyncio.run(run())
    assert first == ["file-4", "file-3"] and more and rest == ["file-2", "file-1", "file-0"]
    assert oldest == ["file-0", "file-1", "file-2", "file-3", "file-4", "file-other"] and mine == []
