"""The batch job worker: runs the jobs of ``/v1/batches`` (``gateway/batches.py``) in the gateway that holds them.

A job runs in the gateway that holds it (``BatchStore.claim``), one task per job:
``validating → in_progress → finalizing → completed``, or ``failed`` (its input does not fit the job),
``cancelling → cancelled``, ``expired`` (past its completion window). Each request goes through the gateway's
own generation handler (``make_generate``), as the job's key: checked against the key's models and limits,
routed like any request, and metered with one usage row (its end user is the job's id unless the body names
one). Its result is recorded in the store once (``record_result``): a job resumed after a restart or a kill -9
skips what is recorded and never recomputes it. Transient failures (no answer, 408, 5xx but 501) are retried
with backoff up to the retry policy's count; a 429 (a limit) is waited out without spending one; the rest go
to the errors file.

A cancel works as OpenAI's does: while ``cancelling`` no request starts and none is retried, the requests in
flight finish and their results are kept, then the job is ``cancelled``. A request still running
``request_timeout_seconds`` after the cancel is cut then (not a result: it is in neither file). Expiry, a lost
hold and a shutdown cut the requests in flight at once.

Batch work yields to interactive work, per local model, across all jobs:

- a job never holds the last free slot of its plan's concurrency (at most ``concurrency - 1`` batch requests
  in flight, and 1 when the plan's concurrency is 1), so an interactive request never queues behind a batch;
- while interactive requests come (one started in the last ``INTERACTIVE_SECONDS``), batches hold one slot:
  every sequence in a step slows the others' steps (on CPU about 1 ms more to an interactive first token per
  running sequence, docs/batch.md), so an interactive request meets at most one more stream than it would
  without batches. The batch's requests already running finish; it takes no new slot above one until the
  interactive traffic has been quiet that long.

A provider model takes at most ``PROVIDER_SLOTS`` batch requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from memserve.batch.execute import RetryPolicy
from memserve.batch.format import (
    BatchRequest,
    LineProblem,
    check_line,
    error_line,
    is_transient,
    new_batch_request_id,
    output_line,
)
from memserve.config import Settings
from memserve.errors import StoreUnavailable
from memserve.gateway.auth import ANONYMOUS, USER_HEADER, Caller
from memserve.gateway.metering import CLIENT_CLOSED_REQUEST, RequestRecord, answer_metered
from memserve.pool.pool import ModelPool
from memserve.store.batches import BatchStore, StoredBatch, this_holder

if TYPE_CHECKING:
    from memserve.gateway.app import Service

log = logging.getLogger(__name__)

PROVIDER_SLOTS = 8
"""Batch requests in flight at once per provider model (a provider's own limits answer 429s, retried)."""
INTERACTIVE_SECONDS = 5.0
"""Batches keep to one slot of a local model until its interactive requests have been quiet this long."""
BATCH_CLIENT = ("batch", 0)
"""The ASGI scope's ``client`` of a batch request (``make_generate``): what tells it from an interactive one."""
HOLD = timedelta(seconds=30)
"""How long a gateway's hold on a job lasts unless renewed (every third of it while the job runs)."""
SCAN_SECONDS = 10.0
"""How often a gateway looks for jobs nobody holds (another gateway stopped, or a hold ran out)."""
_LIMITED_BACKOFF_STEPS = 6
"""A 429 is waited out (its Retry-After, else a backoff growing to base × 2^5) without spending a retry: a
key's requests-per-minute limit slows a job down, it does not fail its requests. A cancel ends the wait."""
Generate = Callable[[Caller, BatchRequest, str, asyncio.Event], Coroutine[Any, Any, "Answer"]]


@dataclass(frozen=True)
class Answer:
    """What one request got: an HTTP status and its JSON body (None: no answer; ``status`` None: none at all)."""

    status: int | None
    body: dict[str, Any] | None
    request_id: str
    retry_after_seconds: float | None = None
    message: str = ""


@dataclass
class _Job:
    """One job this gateway runs: its task, and two events. ``winding``: start no request and retry none (a
    cancel, then the rest); ``stop``: cut the requests in flight too (expiry, a lost hold, a store failure, a
    cancel's deadline)."""

    batch_id: str
    task: asyncio.Task[None] | None = None
    winding: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    why: str | None = None  # "cancelled", "expired" or "lost": why it winds down
    deadline: asyncio.TimerHandle | None = None  # a cancel's: when the requests still in flight are cut

    def halt(self, why: str | None = None) -> None:
        """Stop at once: no new request, and the ones in flight cut (abandoned, not recorded)."""
        self.why = self.why or why
        self.winding.set()
        self.stop.set()


class Slots:
    """Batch requests in flight per model, bounded by ``limit(model)``, read at each take and again every
    ``recheck_seconds`` while one waits (a reload with another plan, or interactive traffic going quiet, changes
    it). ``high_water`` keeps the most ever in flight per model, for tests and the docs."""

    def __init__(self, limit: Callable[[str], int], *, recheck_seconds: float = 0.5) -> None:
        self.limit = limit
        self.recheck_seconds = recheck_seconds
        self.in_flight: dict[str, int] = {}
        self.high_water: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def take(self, model: str) -> None:
        async with self._changed:
            while self.in_flight.get(model, 0) >= max(1, self.limit(model)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.recheck_seconds)
            self.in_flight[model] = self.in_flight.get(model, 0) + 1
            self.high_water[model] = max(self.high_water.get(model, 0), self.in_flight[model])

    async def give(self, model: str) -> None:
        async with self._changed:
            self.in_flight[model] -= 1
            self._changed.notify_all()


class BatchJobs:
    """Runs this gateway's jobs: resumes the store's active ones at start, one task per job, stops at shutdown."""

    def __init__(
        self,
        settings: Settings,
        pool: ModelPool,
        generate: Generate,
        *,
        retry: RetryPolicy | None = None,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.generate = generate
        self.retry = retry or RetryPolicy()
        self.holder = holder or this_holder()
        self.slots = Slots(self.model_slots)
        self.interactive_at: dict[str, float] = {}  # per model: when its last interactive request started
        self.store: BatchStore | None = None
        self.jobs: dict[str, _Job] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._rng = random.Random()

    def interactive(self, model: str) -> None:
        """An interactive request for ``model`` starts: its batches keep to one slot for a while."""
        self.interactive_at[model] = time.monotonic()

    def model_slots(self, model: str) -> int:
        """Batch requests ``model`` may have in flight: one while interactive requests come, else its plan's
        concurrency less one (never less than one)."""
        if self.settings.model(model) is None:
            return PROVIDER_SLOTS
        if time.monotonic() - self.interactive_at.get(model, -math.inf) < INTERACTIVE_SECONDS:
            return 1
        entry = self.pool.entries.get(model)
        plan = entry.plan if entry is not None else None
        concurrency = plan.concurrency if plan is not None else self.settings.model(model).concurrency  # type: ignore[union-attr]
        return max(1, concurrency - 1)

    async def start(self, store: BatchStore) -> None:
        self.store = store
        self._scanner = asyncio.create_task(self._scan(), name="batch-scan")

    async def stop(self) -> None:
        """Stop every job (in-flight requests are abandoned, not recorded: a resume runs them again) and give
        their holds back, so the next gateway on this database resumes them at once."""
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner
        jobs = [job for job in self.jobs.values() if job.task is not None]
        for job in jobs:
            job.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(job.task for job in jobs if job.task is not None), return_exceptions=True)
        if self.store is not None:
            for job in jobs:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release(job.batch_id, self.holder)
        self.jobs.clear()
        self.store = None

    def submit(self, batch_id: str) -> None:
        """Run a job here (if nobody else holds it); a no-op when it already runs here."""
        if batch_id in self.jobs or self.store is None:
            return
        job = _Job(batch_id)
        self.jobs[batch_id] = job
        job.task = asyncio.create_task(self._run(job), name=f"batch {batch_id}")

    def cancel(self, batch_id: str) -> None:
        """Wind the job down as OpenAI's cancel does: no new request, the ones in flight finish (their results
        kept), cut only if still running ``request_timeout_seconds`` from now."""
        job = self.jobs.get(batch_id)
        if job is None or job.winding.is_set():
            return
        job.why = job.why or "cancelled"
        job.winding.set()
        bound = self.settings.request_timeout_seconds
        job.deadline = asyncio.get_running_loop().call_later(bound, job.stop.set)

    async def _scan(self) -> None:
        """Take up the active jobs nobody runs: at start (a restart resumes) and every ``SCAN_SECONDS``."""
        while True:
            try:
                assert self.store is not None
                for batch_id in await self.store.active_batches():
                    self.submit(batch_id)
            except StoreUnavailable as exc:
                log.warning("batch jobs: cannot read the store (%s); retrying in %g s", exc.message, SCAN_SECONDS)
            await asyncio.sleep(SCAN_SECONDS)

    async def _run(self, job: _Job) -> None:
        store = self.store
        assert store is not None
        try:
            if not await store.claim(job.batch_id, self.holder, HOLD):
                return
            keeper = asyncio.create_task(self._keep(job, store), name=f"batch {job.batch_id} hold")
            try:
                await self._work(job, store)
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
        except StoreUnavailable as exc:
            log.warning("batch %s: the store failed (%s); it resumes on the next scan", job.batch_id, exc.message)
        except Exception:
            log.exception("batch %s: internal error; it resumes on the next scan", job.batch_id)
        finally:
            if job.deadline is not None:
                job.deadline.cancel()
            if self.jobs.get(job.batch_id) is job:
                del self.jobs[job.batch_id]

    async def _keep(self, job: _Job, store: BatchStore) -> None:
        """Renew the hold while the job runs, and hear of a cancel made through another gateway."""
        while True:
            await asyncio.sleep(HOLD.total_seconds() / 3)
            with contextlib.suppress(StoreUnavailable):
                if not await store.claim(job.batch_id, self.holder, HOLD):
                    job.halt("lost")  # another gateway has it now (or it was finished)
                    return
                found = await store.get_batch(job.batch_id)
                if found is not None and found.status == "cancelling":
                    self.cancel(job.batch_id)

    async def _work(self, job: _Job, store: BatchStore) -> None:
        batch = await store.get_batch(job.batch_id)
        if batch is None:
            return
        if batch.status == "validating":
            batch = await self._validate(batch, store)
        if batch.status == "in_progress":
            caller = await self._caller(batch, store)
            if caller is None:
                return
            await self._execute(job, batch, caller, store)
            batch = await store.get_batch(batch.id) or batch
            if job.why == "expired":
                await self._expire(batch, store)
                return
        if batch.status == "in_progress" and batch.completed + batch.failed >= batch.total:
            await store.update_batch(batch.id, when=("in_progress",), status="finalizing", finalizing_at=_now())
            batch = await store.get_batch(batch.id) or batch
        if batch.status == "finalizing":
            await store.finish(batch.id, status="completed", stamp="completed_at", from_status=("finalizing",))
        elif batch.status == "cancelling":
            await store.finish(batch.id, status="cancelled", stamp="cancelled_at", from_status=("cancelling",))

    async def _validate(self, batch: StoredBatch, store: BatchStore) -> StoredBatch:
        """Check the input again as this job reads it (every url must be the job's endpoint); count it."""
        count, problems, first_line = 0, list[LineProblem](), dict[str, int]()
        async for number, raw in _lines(store, batch.input_file_id):
            checked = check_line(number, raw)
            if checked is None:
                continue
            count += 1
            if isinstance(checked, LineProblem):
                problems.append(checked)
            elif checked.url != batch.endpoint:
                problems.append(LineProblem(number, f"url {checked.url} is not the batch's endpoint {batch.endpoint}"))
            elif first_line.setdefault(checked.custom_id, number) != number:
                problems.append(LineProblem(number, f"duplicate custom_id {checked.custom_id!r}"))
        if count == 0 and not problems:
            problems.append(LineProblem(1, "the input file has no request"))
        if problems:
            errors = [
                {"code": "invalid_request", "message": p.message, "param": None, "line": p.line}
                for p in problems[:1000]
            ]
            await store.update_batch(
                batch.id, when=("validating",), status="failed", failed_at=_now(), errors=errors, total=count
            )
        else:
            await store.update_batch(
                batch.id, when=("validating",), status="in_progress", in_progress_at=_now(), total=count
            )
        return await store.get_batch(batch.id) or batch

    async def _caller(self, batch: StoredBatch, store: BatchStore) -> Caller | None:
        """The job's key as a caller; None (and the job failed) when the key was revoked or has expired."""
        if batch.key_id is None:
            return Caller(admin=True, name=batch.key_name) if batch.key_name else ANONYMOUS
        key = await store.owner_key(batch.key_id)
        why = "deleted" if key is None else key.active(_now())
        if key is None or why is not None:
            errors = [{"code": "key_inactive", "message": f"the key that created this batch is {why}", "line": None}]
            await store.update_batch(batch.id, errors=errors)
            await store.finish(batch.id, status="failed", stamp="failed_at", from_status=("in_progress",))
            return None
        return Caller(key=key, admin=key.admin, name=key.name)

    async def _execute(self, job: _Job, batch: StoredBatch, caller: Caller, store: BatchStore) -> None:
        """Run every request not yet recorded, a model's slots at a time, until done or winding down; then wait
        for the requests in flight (a cancel's finish; a stop's are cut)."""
        done = await store.done_ids(batch.id)
        running: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []

        async def one(request: BatchRequest, model: str) -> None:
            try:
                await self._request(job, batch, caller, request, store)
            except BaseException as exc:  # a store failure: stop the job; the next scan resumes it
                if not isinstance(exc, asyncio.CancelledError):
                    failures.append(exc)
                    job.halt()
                raise
            finally:
                await self.slots.give(model)

        try:
            async for number, raw in _lines(store, batch.input_file_id):
                request = check_line(number, raw)
                if not isinstance(request, BatchRequest) or request.custom_id in done:
                    continue
                if _now() >= batch.times["expires_at"]:  # type: ignore[operator]
                    job.halt("expired")
                if job.winding.is_set():
                    break
                model = str(request.body.get("model"))
                if not await self._take(model, job.winding):
                    break
                task = asyncio.create_task(one(request, model), name=f"batch {batch.id} {request.custom_id}")
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if failures:
            raise failures[0]

    async def _take(self, model: str, stop: asyncio.Event) -> bool:
        """A batch slot on ``model``; False (and none held) when ``stop`` is set first."""
        taking = asyncio.create_task(self.slots.take(model))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not taking.done():
            taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taking
        if taking.cancelled():
            return False
        if stop.is_set():
            await self.slots.give(model)
            return False
        return True

    async def _request(
        self, job: _Job, batch: StoredBatch, caller: Caller, request: BatchRequest, store: BatchStore
    ) -> None:
        """One request to its result: retried while transient, then recorded once. Not recorded when it is cut
        (the job stopped) or would be retried while the job winds down: a resume or a new job runs it again."""
        attempt = 0
        while True:
            work = asyncio.create_task(self.generate(caller, request, batch.id, job.stop))
            stopping = asyncio.create_task(job.stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not work.done():  # a provider's answer is not cut by the client leaving: cut it here
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            if work.cancelled() or (job.stop.is_set() and work.result().status in (None, CLIENT_CLOSED_REQUEST)):
                return  # abandoned by a cancel or a shutdown: not a result, a resume runs it again
            answer = work.result()
            if answer.status == 200 and answer.body is not None:
                record = output_line(
                    request,
                    status_code=200,
                    body=answer.body,
                    request_id=answer.request_id,
                    batch_request_id=new_batch_request_id(),
                )
                await store.record_result(batch.id, request.custom_id, line=request.line, ok=True, record=record)
                return
            limited = answer.status == 429  # a limit (the key's, a queue's, a provider's): wait, never give up
            attempt = attempt + 1 if not limited else min(attempt + 1, _LIMITED_BACKOFF_STEPS)
            if limited or (is_transient(answer.status) and attempt <= self.retry.max_retries):
                delay = self.retry.delay_seconds(max(attempt, 1), answer.retry_after_seconds, self._rng)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.winding.wait(), delay)
                if job.winding.is_set():
                    return
                continue
            error = (answer.body or {}).get("error") if isinstance(answer.body, dict) else None
            code = str((error or {}).get("code") or (error or {}).get("type") or "request_failed")
            message = str((error or {}).get("message") or answer.message or f"HTTP {answer.status}")
            record = error_line(
                request,
                code=code,
                message=message,
                batch_request_id=new_batch_request_id(),
                status_code=answer.status,
                body=answer.body,
                request_id=answer.request_id,
            )
            await store.record_result(batch.id, request.custom_id, line=request.line, ok=False, record=record)
            return

    async def _expire(self, batch: StoredBatch, store: BatchStore) -> None:
        """Past the completion window: every request not run goes to the errors file as ``batch_expired``."""
        done = await store.done_ids(batch.id)
        async for number, raw in _lines(store, batch.input_file_id):
            request = check_line(number, raw)
            if isinstance(request, BatchRequest) and request.custom_id not in done:
                record = error_line(
                    request,
                    code="batch_expired",
                    message="this request was not run within the batch's completion window",
                    batch_request_id=new_batch_request_id(),
                )
                await store.record_result(batch.id, request.custom_id, line=number, ok=False, record=record)
        await store.finish(batch.id, status="expired", stamp="expired_at", from_status=("in_progress", "cancelling"))


async def _lines(store: BatchStore, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
    """A stored file's lines with their 1-based numbers, a part at a time (a line may span parts)."""
    carry = b""
    number = 0
    async for part in store.content(file_id):
        pieces = (carry + part).split(b"\n")
        carry = pieces.pop()
        for piece in pieces:
            number += 1
            yield number, piece
    if carry:
        yield number + 1, carry


def _now() -> datetime:
    return datetime.now(UTC)


def make_generate(routes: dict[str, Callable[[Request], Awaitable[Response]]], service: Service) -> Generate:
    """A batch request through the gateway's own generation handler, as its job's caller: the same checks,
    routing, limits and usage row as a client's request (what ``_HotRoutes`` does for one, without HTTP)."""

    async def generate(caller: Caller, request: BatchRequest, batch_id: str, stop: asyncio.Event) -> Answer:
        handler = routes[request.url]
        raw = json.dumps(request.body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        if "user" not in request.body:
            headers.append((USER_HEADER.encode(), batch_id.encode()))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": request.url,
            "raw_path": request.url.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": BATCH_CLIENT,
            "server": None,
            "state": {"caller": caller},
        }
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await stop.wait()  # a cancel or a shutdown: the handler sees its client leave and stops the work
            return {"type": "http.disconnect"}

        status: int | None = None
        retry_after: str | None = None
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status, retry_after
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"retry-after":
                        retry_after = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await answer_metered(
            handler, scope, receive, send, service, what=f"batch {batch_id} request {request.custom_id}"
        )
        record: RequestRecord = scope["state"]["record"]
        body = record.answer  # the upstream's whole answer, as its relay parsed it
        if body is None:  # an answer the gateway made (an error, say): its bytes
            with contextlib.suppress(ValueError):
                parsed = json.loads(b"".join(chunks)) if chunks else None
                body = parsed if isinstance(parsed, dict) else None
        request_id = str((body or {}).get("id") or f"req_{os.urandom(12).hex()}")
        return Answer(status, body, request_id, _seconds(retry_after))

    return generate


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


__all__ = [
    "BATCH_CLIENT",
    "HOLD",
    "INTERACTIVE_SECONDS",
    "PROVIDER_SLOTS",
    "SCAN_SECONDS",
    "Answer",
    "BatchJobs",
    "Generate",
    "Slots",
    "make_generate",
]
