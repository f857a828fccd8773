"""Files and batch jobs as OpenAI's Files and Batch API name them: rows, content in parts, results once each.

A file's content is stored in the database in parts of ``PART_BYTES`` (``file_parts``), not in the data
folder: gateways sharing one Postgres serve each other's files and jobs, a job's output file and its final
status commit together (a kill -9 leaves either both or neither), and content streams in and out a part at
a time. A job's results are rows keyed by (batch_id, custom_id): ``record_result`` inserts one at most once
and counts it in the job's ``request_counts`` in the same transaction, so a resumed job skips exactly what
was recorded and never counts a request twice.

Several gateways may run jobs from one database: a job is run by the gateway that holds it (``claim``,
renewed while it runs); a holder that stopped renewing, or whose process is gone from this host, is
replaced.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from memserve.store.faults import Target, translated
from memserve.store.keys import ApiKey
from memserve.store.schema import api_keys, batch_results, batches, file_parts, files

PART_BYTES = 1 << 20
_PAGE_ROWS = 1000
OUTPUT_PURPOSE = "batch_output"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses a job runner still has work in; the rest are final."""
FINAL = ("completed", "failed", "expired", "cancelled")
_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


@dataclass(frozen=True)
class StoredFile:
    """One file's row; ``to_openai`` is OpenAI's File object."""

    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime
    key_id: str | None

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",  # deprecated by OpenAI, still read by older clients
            "expires_at": None,
            "status_details": None,
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredFile:
        m = row._mapping
        return cls(m["id"], m["purpose"], m["filename"], m["bytes"], m["created_at"], m["key_id"])


@dataclass(frozen=True)
class StoredBatch:
    """One job's row; ``to_openai`` is OpenAI's Batch object."""

    id: str
    status: str
    endpoint: str
    completion_window: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    key_id: str | None
    key_name: str | None
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    total: int
    completed: int
    failed: int
    times: dict[str, datetime | None]
    holder: str | None
    held_until: datetime | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_openai(self) -> dict[str, Any]:
        stamp = {name: int(t.timestamp()) if t is not None else None for name, t in self.times.items()}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **stamp,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredBatch:
        m = row._mapping
        return cls(
            id=m["id"],
            status=m["status"],
            endpoint=m["endpoint"],
            completion_window=m["completion_window"],
            input_file_id=m["input_file_id"],
            output_file_id=m["output_file_id"],
            error_file_id=m["error_file_id"],
            key_id=m["key_id"],
            key_name=m["key_name"],
            metadata=m["metadata"],
            errors=m["errors"],
            total=m["total"],
            completed=m["completed"],
            failed=m["failed"],
            times={name: m[name] for name in _TIMES},
            holder=m["holder"],
            held_until=m["held_until"],
        )


def this_holder() -> str:
    """This process as a job's holder: ``host:pid:start`` (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}"


def holder_gone(holder: str) -> bool:
    """Whether ``holder`` was a process on this host that no longer runs (a kill -9 leaves its claim)."""
    host, _, rest = holder.partition(":")
    pid_text, _, start_text = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another host's: wait for its claim to run out
    try:
        process = psutil.Process(int(pid_text))
        return str(int(process.create_time())) != start_text or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class BatchStore:
    """The queries behind ``/v1/files`` and ``/v1/batches`` and the gateway's job runner."""

    def __init__(self, engine: AsyncEngine, target: Target, *, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._target = target
        self._clock = clock

    # ------------------------------------------------------------------------------------------------ files

    async def create_file(
        self, file_id: str, *, purpose: str, filename: str, key_id: str | None, parts: Iterable[bytes]
    ) -> StoredFile:
        """Store a file from its content's ``parts`` (each at most ``PART_BYTES``), in one transaction."""
        with translated(self._target):
            async with self._engine.begin() as conn:
                return await self._insert_file(conn, file_id, purpose, filename, key_id, parts)

    async def _insert_file(
        self,
        conn: AsyncConnection,
        file_id: str,
        purpose: str,
        filename: str,
        key_id: str | None,
        parts: Iterable[bytes] | AsyncIterator[bytes],
    ) -> StoredFile:
        size = number = 0
        if isinstance(parts, AsyncIterator):
            async for data in parts:
                size, number = size + len(data), number + 1
                await conn.execute(sa.insert(file_parts).values(file_id=file_id, part=number - 1, data=data))
        else:
            for data in parts:
                size, number = size + len(data), number + 1
                await conn.execute(sa.insert(file_parts).values(file_id=file_id, part=number - 1, data=data))
        stored = StoredFile(file_id, purpose, filename, size, self._clock(), key_id)
        await conn.execute(
            sa.insert(files).values(
                id=file_id, purpose=purpose, filename=filename, bytes=size, created_at=stored.created_at, key_id=key_id
            )
        )
        return stored

    async def get_file(self, file_id: str) -> StoredFile | None:
        with translated(self._target):
            async with self._engine.connect() as conn:
                row = (await conn.execute(sa.select(files).where(files.c.id == file_id))).first()
        return StoredFile.from_row(row) if row is not None else None

    async def list_files(
        self,
        *,
        key_id: str | None,
        everyone: bool,
        purpose: str | None,
        limit: int,
        after: str | None,
        newest_first: bool,
    ) -> tuple[list[StoredFile], bool]:
        """A page of files (``key_id``'s, or ``everyone``'s) and whether more follow, by creation time."""
        query = sa.select(files)
        if not everyone:
            query = query.where(files.c.key_id.is_(None) if key_id is None else files.c.key_id == key_id)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        rows = await self._page(query, files, limit=limit, after=after, newest_first=newest_first)
        return [StoredFile.from_row(r) for r in rows[:limit]], len(rows) > limit

    async def content(self, file_id: str) -> AsyncIterator[bytes]:
        """A file's content, one part per query: memory holds one part, whatever the file's size."""
        part = 0
        while True:
            with translated(self._target):
                async with self._engine.connect() as conn:
                    data = (
                        await conn.execute(
                            sa.select(file_parts.c.data).where(
                                file_parts.c.file_id == file_id, file_parts.c.part == part
                            )
                        )
                    ).scalar()
            if data is None:
                return
            yield bytes(data)
            part += 1

    async def delete_file(self, file_id: str) -> bool:
        """Remove a file and its content; False when there was none."""
        with translated(self._target):
            async with self._engine.begin() as conn:
                await conn.execute(sa.delete(file_parts).where(file_parts.c.file_id == file_id))
                gone = await conn.execute(sa.delete(files).where(files.c.id == file_id))
        return bool(gone.rowcount)

    async def batches_reading(self, file_id: str) -> list[str]:
        """The active jobs whose input is ``file_id`` (it cannot be deleted under them)."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(batches.c.id).where(batches.c.input_file_id == file_id, batches.c.status.in_(ACTIVE))
                )
                return [r[0] for r in rows]

    # ---------------------------------------------------------------------------------------------- batches

    async def create_batch(
        self,
        batch_id: str,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: timedelta,
        window_text: str,
        key_id: str | None,
        key_name: str | None,
        metadata: dict[str, str] | None,
    ) -> StoredBatch:
        now = self._clock()
        values = {
            "id": batch_id,
            "status": "validating",
            "endpoint": endpoint,
            "completion_window": window_text,
            "input_file_id": input_file_id,
            "key_id": key_id,
            "key_name": key_name,
            "metadata": metadata,
            "total": 0,
            "completed": 0,
            "failed": 0,
            "created_at": now,
            "expires_at": now + completion_window,
        }
        with translated(self._target):
            async with self._engine.begin() as conn:
                await conn.execute(sa.insert(batches).values(**values))
        found = await self.get_batch(batch_id)
        assert found is not None
        return found

    async def get_batch(self, batch_id: str) -> StoredBatch | None:
        with translated(self._target):
            async with self._engine.connect() as conn:
                row = (await conn.execute(sa.select(batches).where(batches.c.id == batch_id))).first()
        return StoredBatch.from_row(row) if row is not None else None

    async def list_batches(
        self, *, key_id: str | None, everyone: bool, limit: int, after: str | None
    ) -> tuple[list[StoredBatch], bool]:
        """A page of jobs, newest first (as OpenAI lists them), and whether more follow."""
        query = sa.select(batches)
        if not everyone:
            query = query.where(batches.c.key_id.is_(None) if key_id is None else batches.c.key_id == key_id)
        rows = await self._page(query, batches, limit=limit, after=after, newest_first=True)
        return [StoredBatch.from_row(r) for r in rows[:limit]], len(rows) > limit

    async def active_batches(self) -> list[str]:
        """Jobs with work left, oldest first: what a starting gateway resumes."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(batches.c.id).where(batches.c.status.in_(ACTIVE)).order_by(batches.c.created_at)
                )
                return [r[0] for r in rows]

    async def update_batch(self, batch_id: str, *, when: Iterable[str] | None = None, **values: Any) -> bool:
        """Set ``values`` on a job, only while its status is one of ``when`` (when given); True if it changed.

        The status guard makes each transition one statement: a cancel and the runner finishing at the same
        moment cannot both win.
        """
        query = sa.update(batches).where(batches.c.id == batch_id).values(**values)
        if when is not None:
            query = query.where(batches.c.status.in_(tuple(when)))
        with translated(self._target):
            async with self._engine.begin() as conn:
                changed = await conn.execute(query)
        return bool(changed.rowcount)

    async def claim(self, batch_id: str, holder: str, hold: timedelta) -> bool:
        """Hold an active job for ``hold`` (or renew it): True when this holder runs it now.

        Taken when nobody holds it, the holder is this one, its hold ran out, or its holder was a process on
        this host that is gone (a kill -9 leaves a hold nobody renews).
        """
        now = self._clock()
        with translated(self._target):
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(
                        sa.select(batches.c.holder, batches.c.held_until, batches.c.status).where(
                            batches.c.id == batch_id
                        )
                    )
                ).first()
                if row is None or row.status not in ACTIVE:
                    return False
                free = (
                    row.holder is None
                    or row.holder == holder
                    or row.held_until is None
                    or row.held_until <= now
                    or holder_gone(row.holder)
                )
                if not free:
                    return False
                taken = await conn.execute(
                    sa.update(batches)
                    .where(batches.c.id == batch_id, _same(batches.c.holder, row.holder))
                    .values(holder=holder, held_until=now + hold)
                )
                return bool(taken.rowcount)

    async def release(self, batch_id: str, holder: str) -> None:
        """Give a job up (a clean shutdown): another gateway, or this one restarted, takes it at once."""
        with translated(self._target):
            async with self._engine.begin() as conn:
                await conn.execute(
                    sa.update(batches)
                    .where(batches.c.id == batch_id, batches.c.holder == holder)
                    .values(holder=None, held_until=None)
                )

    async def owner_key(self, key_id: str) -> ApiKey | None:
        """The key a job runs as (revoked and expired ones too: the caller decides), None if it is gone."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.select(*[c for c in api_keys.c if c.name != "hash"]).where(api_keys.c.id == key_id)
                    )
                ).first()
        return ApiKey.from_row(row) if row is not None else None

    # ---------------------------------------------------------------------------------------------- results

    async def record_result(
        self, batch_id: str, custom_id: str, *, line: int, ok: bool, record: dict[str, Any]
    ) -> bool:
        """Record one request's result and count it, once: False (and nothing changed) if it was recorded."""
        values = {
            "batch_id": batch_id,
            "custom_id": custom_id,
            "line": line,
            "ok": ok,
            "record": json.dumps(record, ensure_ascii=False, separators=(",", ":")),
            "created_at": self._clock(),
        }
        with translated(self._target):
            async with self._engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert as pg_insert

                    query: Any = pg_insert(batch_results).values(**values).on_conflict_do_nothing()
                else:
                    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                    query = sqlite_insert(batch_results).values(**values).on_conflict_do_nothing()
                inserted = await conn.execute(query)
                if not inserted.rowcount:
                    return False
                counter = batches.c.completed if ok else batches.c.failed
                await conn.execute(
                    sa.update(batches).where(batches.c.id == batch_id).values({counter.name: counter + 1})
                )
                return True

    async def done_ids(self, batch_id: str) -> set[str]:
        """The custom_ids a job has results for: a resumed job skips them."""
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = await conn.stream(
                    sa.select(batch_results.c.custom_id).where(batch_results.c.batch_id == batch_id)
                )
                return {r[0] async for r in rows}

    async def finish(self, batch_id: str, *, status: str, stamp: str, from_status: Iterable[str]) -> StoredBatch | None:
        """Write a job's output and errors files from its results and set its final ``status``, in one
        transaction (only while its status is one of ``from_status``); None if it was not.

        Each file keeps the input's line order; a file with no line is not made (its id stays null), as
        OpenAI does.
        """
        now = self._clock()
        with translated(self._target):
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(
                        sa.select(batches).where(batches.c.id == batch_id, batches.c.status.in_(tuple(from_status)))
                    )
                ).first()
                if row is None:
                    return None
                ids: dict[str, str | None] = {}
                counts = {True: row.completed, False: row.failed}
                for ok, column in ((True, "output_file_id"), (False, "error_file_id")):
                    if not counts[ok]:
                        ids[column] = None
                        continue
                    file_id = f"file-{os.urandom(12).hex()}"
                    name = f"{batch_id}_{'output' if ok else 'error'}.jsonl"
                    parts = _result_parts(conn, batch_id, ok)
                    await self._insert_file(conn, file_id, OUTPUT_PURPOSE, name, row.key_id, parts)
                    ids[column] = file_id
                await conn.execute(
                    sa.update(batches)
                    .where(batches.c.id == batch_id)
                    .values(status=status, holder=None, held_until=None, **{stamp: now}, **ids)
                )
        return await self.get_batch(batch_id)

    # ---------------------------------------------------------------------------------------------- helpers

    async def _page(
        self, query: sa.Select[Any], table: sa.Table, *, limit: int, after: str | None, newest_first: bool
    ) -> list[Row[Any]]:
        """``limit + 1`` rows after the row ``after`` (a cursor by id), ordered by (created_at, id)."""
        created, ident = table.c.created_at, table.c.id
        with translated(self._target):
            async with self._engine.connect() as conn:
                if after is not None:
                    cursor = (await conn.execute(sa.select(created).where(ident == after))).scalar()
                    if cursor is not None:
                        key = sa.tuple_(created, ident)
                        query = query.where(key < (cursor, after) if newest_first else key > (cursor, after))
                order = (created.desc(), ident.desc()) if newest_first else (created, ident)
                return list((await conn.execute(query.order_by(*order).limit(limit + 1))).all())


def _same(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


async def _result_parts(conn: AsyncConnection, batch_id: str, ok: bool) -> AsyncIterator[bytes]:
    """A job's result lines of one kind, in input order, as file parts of ``PART_BYTES`` (the last shorter; a
    part may end mid-line). Read a page of rows at a time: memory holds one page and one part."""
    buffer = bytearray()
    last_line = 0
    while True:
        rows = (
            await conn.execute(
                sa.select(batch_results.c.line, batch_results.c.record)
                .where(batch_results.c.batch_id == batch_id, batch_results.c.ok == ok, batch_results.c.line > last_line)
                .order_by(batch_results.c.line)
                .limit(_PAGE_ROWS)
            )
        ).all()
        for line, record in rows:
            buffer += record.encode("utf-8") + b"\n"
            last_line = line
            while len(buffer) >= PART_BYTES:
                yield bytes(buffer[:PART_BYTES])
                del buffer[:PART_BYTES]
        if len(rows) < _PAGE_ROWS:
            break
    if buffer:
        yield bytes(buffer)


__all__ = ["ACTIVE", "FINAL", "PART_BYTES", "BatchStore", "StoredBatch", "StoredFile", "holder_gone", "this_holder"]
