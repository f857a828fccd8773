"""Usage: one row per request, buffered in memory and written in batches off the request path.

``record`` appends to a list and returns: it never waits for the database. A background task writes the
buffer every ``flush_seconds`` (or as soon as ``batch_rows`` are waiting) as one multi-row INSERT in one
transaction. A failed write keeps its rows for the next try, up to ``max_pending_rows``; past that the
oldest are dropped and counted in ``lost_rows`` (``health()`` shows both, for ``/health``). A row the
database refuses for what it holds is found by halves and dropped alone (counted and logged): one bad row
never holds the others back. ``close``
writes everything left, so a SIGTERM loses nothing; a SIGKILL loses what was waiting, at most one flush
interval of rows.

The limit queries (``tokens_since``, ``requests_since``) add the rows still in memory to one indexed
SELECT, and never run while a write commits, so on one gateway they count every row exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from memserve.errors import InvalidArgument, StoreUnavailable
from memserve.store.faults import Target, refused_rows, translated
from memserve.store.schema import usage

log = logging.getLogger("memserve.store")

GroupBy = Literal["key", "user", "model", "day"]
GROUPS: tuple[GroupBy, ...] = ("key", "user", "model", "day")


@dataclass(frozen=True, kw_only=True)
class UsageRow:
    """One request as the usage table keeps it. ``time`` is timezone-aware (stored as UTC).

    ``key_id``/``key_name`` are None with auth off; ``provider`` is "local" or the remote provider's name.
    """

    time: datetime
    model: str
    provider: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    duration_seconds: float
    status: int
    key_id: str | None = None
    key_name: str | None = None
    end_user: str | None = None
    ttft_seconds: float | None = None
    error_type: str | None = None
    fallback: bool = False
    admitted: bool = True  # passed admission and was sent on: only these count against a key's limits

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise InvalidArgument(f"UsageRow.time must be timezone-aware (UTC); got {self.time.isoformat()}.")


class _CommitGate:
    """Readers (limit queries) and a commit never overlap: a reader then sees each row in the database or
    in memory, never both nor neither. A commit waits for running readers; new readers wait for it."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._committing = False

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._committing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def committing(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._committing)
            self._committing = True
            await self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._committing = False
                self._cond.notify_all()


class UsageLog:
    """The usage buffer, its flusher and the queries over the usage table."""

    def __init__(
        self,
        engine: AsyncEngine,
        target: Target,
        *,
        flush_seconds: float = 1.0,
        batch_rows: int = 500,
        max_pending_rows: int = 100_000,
        after_flush: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine
        self._target = target
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.max_pending_rows = max_pending_rows
        self._after_flush = after_flush
        self._buffer: deque[UsageRow] = deque()
        self._inflight: list[UsageRow] = []
        self._lost_rows = 0
        self._last_error: str | None = None
        self._flush_lock = asyncio.Lock()
        self._gate = _CommitGate()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.flushed_rows = 0
        self.flush_sizes: list[int] = []  # rows per successful write, for the benchmark; bounded below

    # ---- writing -------------------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one row. Never blocks, never awaits, never raises."""
        if self._closed:
            self._lost_rows += 1
            return
        if len(self._buffer) + len(self._inflight) >= self.max_pending_rows:
            self._buffer.popleft() if self._buffer else None
            self._lost_rows += 1
        self._buffer.append(row)
        if len(self._buffer) >= self.batch_rows:
            self._wake.set()

    def start(self, *, flush_seconds: float | None = None) -> None:
        """Start the background flusher on the running loop (idempotent); ``flush_seconds`` overrides the
        interval given at construction."""
        if flush_seconds is not None:
            self.flush_seconds = flush_seconds
            self._wake.set()  # a running flusher may be waiting out the old interval
        if self._task is None or self._task.done():
            self._closed = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memserve-usage-flusher")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except StoreUnavailable:
                await asyncio.sleep(self.flush_seconds)  # a failing database is retried once an interval
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the flusher die: rows keep coming
                log.exception("usage flusher: unexpected error; retrying in %g s", self.flush_seconds)
                await asyncio.sleep(self.flush_seconds)

    async def flush(self) -> int:
        """Write every buffered row now, in one transaction (``_write_buffer``). Returns the rows written.

        When the database is away the rows go back to the front of the buffer and StoreUnavailable is raised.
        """
        async with self._flush_lock:
            written = await self._write_buffer()
            if self._after_flush is not None:
                try:
                    await self._after_flush()
                except StoreUnavailable as exc:
                    log.warning("could not write keys' last_used_at: %s", exc.message)
            return written

    async def _write_buffer(self) -> int:
        """Write the buffer. A part the database refuses for what it holds (``refused_rows``: a value out of
        range, text it cannot encode) is written again in halves, so that only a row refused alone is lost
        (counted, and logged with the reason); it never holds back the rows behind it. Any other failure (the
        database away, locked, full) keeps every row not yet written for the next try."""
        if not self._buffer:
            return 0
        pending = [list(self._buffer)]
        self._buffer.clear()
        written = 0
        while pending:
            part = pending.pop(0)
            rest = [row for later in pending for row in later]
            try:
                await self._insert(part, rest)
                written += len(part)
            except BaseException as exc:
                self._inflight = []
                if not refused_rows(exc):
                    self._put_back(part + rest)
                    if isinstance(exc, StoreUnavailable):
                        self._failed(exc)
                    elif isinstance(exc, Exception):  # a driver's own error: said, not silent
                        failure = StoreUnavailable(
                            f"writing {len(part)} usage rows failed ({type(exc).__name__}: {exc}); they are kept "
                            "for the next write; if this repeats, report it with the server's log"
                        )
                        self._failed(failure)
                        raise failure from exc
                    raise
                if len(part) > 1:
                    pending[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                    continue
                self._lost_rows += 1
                log.error(
                    "a usage row was refused by the database and is dropped (%s: %s); if this repeats, report it "
                    "with the server's log: %r",
                    type(exc).__name__,
                    exc,
                    part[0],
                )
        self._succeeded(written)
        return written

    async def _insert(self, rows: list[UsageRow], rest: list[UsageRow]) -> None:
        """Insert ``rows`` in one transaction; ``rest`` (rows still to write) is what stays in flight after it."""
        self._inflight = rows + rest
        with translated(self._target):
            async with self._engine.connect() as conn:
                # In slices of at most batch_rows (and SQLite's bound on parameters), so a backlog is
                # several short statements rather than one long pause of the event loop.
                sqlite = conn.dialect.name == "sqlite"
                size = min(self.batch_rows, _SQLITE_ROWS_PER_STATEMENT) if sqlite else self.batch_rows
                for start in range(0, len(rows), size):
                    part = rows[start : start + size]
                    if sqlite:
                        await conn.exec_driver_sql(_sqlite_insert(len(part)), _sqlite_params(part))
                    else:
                        await conn.execute(usage.insert(), [vars(r) for r in part])
                async with self._gate.committing():
                    await conn.commit()
                    self._inflight = rest

    def _put_back(self, rows: list[UsageRow]) -> None:
        room = self.max_pending_rows - len(self._buffer)
        if room < len(rows):  # keep the newest: drop the oldest of the returned rows
            dropped = len(rows) - max(room, 0)
            self._lost_rows += dropped
            rows = rows[dropped:]
        self._buffer.extendleft(reversed(rows))

    def _failed(self, exc: StoreUnavailable) -> None:
        if self._last_error is None:
            log.warning(
                "usage rows could not be written (%d waiting, kept up to %d; the oldest are dropped past that): %s",
                len(self._buffer),
                self.max_pending_rows,
                exc.message,
            )
        self._last_error = exc.message

    def _succeeded(self, rows: int) -> None:
        if self._last_error is not None:
            log.warning("usage rows are written again (%d lost while failing)", self._lost_rows)
        self._last_error = None
        self.flushed_rows += rows
        if len(self.flush_sizes) < 100_000:
            self.flush_sizes.append(rows)

    async def close(self) -> None:
        """Stop the flusher and write everything left. Rows that cannot be written are counted as lost."""
        if self._task is not None:
            async with self._flush_lock:  # never cancel a write half-way: its commit may have landed
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except StoreUnavailable as exc:
            lost = len(self._buffer)
            self._lost_rows += lost
            self._buffer.clear()
            log.error("closing the store: %d usage rows could not be written and are lost: %s", lost, exc.message)
        finally:
            self._closed = True

    def health(self) -> dict[str, Any]:
        """For ``/health``: rows waiting to be written, rows dropped, and the last write error (None once
        a write succeeds again)."""
        return {
            "pending_rows": len(self._buffer) + len(self._inflight),
            "lost_rows": self._lost_rows,
            "last_error": self._last_error,
        }

    @property
    def lost_rows(self) -> int:
        return self._lost_rows

    # ---- queries -------------------------------------------------------------------------------------

    async def tokens_since(self, key_id: str, since: datetime) -> int:
        """Prompt + completion tokens of ``key_id``'s admitted requests since ``since``, rows not yet written
        included."""
        query = sa.select(sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0))
        stored, pending = await self._count(query, key_id, since)
        return int(stored) + sum(r.prompt_tokens + r.completion_tokens for r in pending)

    async def requests_since(self, key_id: str, since: datetime) -> int:
        """Admitted requests of ``key_id`` since ``since``, rows not yet written included."""
        stored, pending = await self._count(sa.select(sa.func.count()), key_id, since)
        return int(stored) + len(pending)

    async def _count(self, query: sa.Select[Any], key_id: str, since: datetime) -> tuple[Any, list[UsageRow]]:
        query = query.select_from(usage).where(
            usage.c.key_id == key_id, usage.c.admitted.is_(True), usage.c.time >= since
        )
        async with self._gate.reading():
            with translated(self._target):
                async with self._engine.connect() as conn:
                    stored = (await conn.execute(query)).scalar_one()
            pending = [
                r for r in _chain(self._inflight, self._buffer) if r.key_id == key_id and r.admitted and r.time >= since
            ]
        return stored, pending

    async def summary(
        self,
        group_by: GroupBy,
        since: datetime | None,
        until: datetime | None,
        key_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests, tokens, errors (status ≥ 400, or an error event in a stream), and mean TTFT and
        duration per group, over written rows.

        ``since`` is inclusive, ``until`` exclusive; ``day`` is the UTC date as ``YYYY-MM-DD``, in order;
        the other groupings come most tokens first.
        """
        if group_by not in GROUPS:
            raise InvalidArgument(f"group_by must be one of {', '.join(GROUPS)}; got {group_by!r}.", param="group_by")
        labels: list[sa.ColumnElement[Any]]
        if group_by == "key":
            labels = [usage.c.key_id.label("key_id"), usage.c.key_name.label("key_name")]
        elif group_by == "user":
            labels = [usage.c.end_user.label("end_user")]
        elif group_by == "model":
            labels = [usage.c.model.label("model")]
        else:  # date() of a naive UTC timestamp: the UTC day on SQLite (text) and Postgres (date) alike
            labels = [sa.func.date(usage.c.time).label("day")]
        tokens = sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens)
        query = sa.select(
            *labels,
            sa.func.count().label("requests"),
            sa.func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(usage.c.completion_tokens).label("completion_tokens"),
            sa.func.sum(sa.case((sa.or_(usage.c.status >= 400, usage.c.error_type.is_not(None)), 1), else_=0)).label(
                "errors"
            ),
            sa.func.avg(usage.c.ttft_seconds).label("avg_ttft_seconds"),
            sa.func.avg(usage.c.duration_seconds).label("avg_duration_seconds"),
        ).group_by(*labels)
        if since is not None:
            query = query.where(usage.c.time >= since)
        if until is not None:
            query = query.where(usage.c.time < until)
        if key_id is not None:
            query = query.where(usage.c.key_id == key_id)
        query = query.order_by(*labels) if group_by == "day" else query.order_by(tokens.desc(), *labels)
        with translated(self._target):
            async with self._engine.connect() as conn:
                rows = (await conn.execute(query)).mappings().all()
        out = []
        for row in rows:
            item = dict(row)
            if group_by == "day" and isinstance(item["day"], date):
                item["day"] = item["day"].isoformat()
            for field in ("requests", "prompt_tokens", "completion_tokens", "errors"):
                item[field] = int(item[field] or 0)
            for field in ("avg_ttft_seconds", "avg_duration_seconds"):
                item[field] = float(item[field]) if item[field] is not None else None
            out.append(item)
        return out


_COLUMNS = [c.name for c in usage.columns if c.name != "id"]
_values = operator.attrgetter(*_COLUMNS)
_TIME = _COLUMNS.index("time")
_SQLITE_ROWS_PER_STATEMENT = 32766 // len(_COLUMNS)  # SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32


@functools.lru_cache(maxsize=8)
def _sqlite_insert(rows: int) -> str:
    """One multi-row INSERT: SQLite then binds every row in one call and steps once with the GIL released.

    ``executemany`` would release and re-take the GIL per row, and a busy event loop on the main thread
    holds it up to the 5 ms switch interval each time: 500 rows could take seconds under load.
    """
    one = "(" + ", ".join("?" * len(_COLUMNS)) + ")"
    return f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES " + ", ".join([one] * rows)


def _sqlite_params(rows: list[UsageRow]) -> tuple[Any, ...]:
    """The rows' values in column order, ``time`` as the naive UTC text SQLAlchemy stores on SQLite."""
    flat: list[Any] = []
    for r in rows:
        values = list(_values(r))
        t = values[_TIME]
        if t.tzinfo is not UTC:
            t = t.astimezone(UTC)
        values[_TIME] = t.replace(tzinfo=None).isoformat(" ", "microseconds")  # SQLAlchemy's SQLite format
        flat.extend(values)
    return tuple(flat)


def _chain(*parts: Iterable[UsageRow]) -> Iterable[UsageRow]:
    for part in parts:
        yield from part
