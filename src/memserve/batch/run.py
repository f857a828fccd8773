"""One ``memserve batch run``: check the input, open the checkpoint, reach the model, run, report progress.

The order matters: the whole input is checked before anything starts (a bad line 9,000 is said now), the
checkpoint's lock is taken before a runner is started (a second run on the same output refuses at once),
and a ``--local`` model is planned before it is started (a NoFit is said before any load).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from memserve.batch.checkpoint import Checkpoint, errors_path_for
from memserve.batch.execute import Progress, RetryPolicy, run_requests
from memserve.batch.format import BatchFileInvalid, read_requests_file, validate
from memserve.batch.jobs import write_progress
from memserve.errors import InvalidArgument

PROGRESS_WRITE_SECONDS = 0.5


@dataclass(frozen=True)
class BatchRun:
    """What one ``batch run`` was asked to do."""

    input: Path
    output: Path
    errors: Path | None = None
    model: str | None = None
    url: str | None = None  # an OpenAI-compatible base URL (with or without /v1)
    local: str | None = None  # a model source to start a runner for
    concurrency: int = 8
    max_retries: int = 5
    api_key: str | None = None
    retry_base_seconds: float = 0.5
    context: int | None = None
    memory: str | None = None
    headroom: str | None = None
    job_id: str | None = None

    @property
    def errors_path(self) -> Path:
        return self.errors if self.errors is not None else errors_path_for(self.output)


@dataclass
class RunView:
    """What the display shows besides the progress record: the runner's memory and restarts with --local."""

    memory_bytes: Callable[[], int] | None = None
    restarts: Callable[[], int] | None = None
    runner_pid: Callable[[], int | None] | None = None
    peak_memory_bytes: Callable[[], int] | None = None


def count_requests(path: Path, *, model: str | None) -> int:
    """The number of requests in the input; :class:`BatchFileInvalid` naming every bad line."""
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file; give the batch's input .jsonl file", param="input")
    with path.open("rb") as handle:
        total, problems = validate(handle, model=model)
    if problems:
        raise BatchFileInvalid(problems, lines_total=total, name=str(path))
    if total == 0:
        raise InvalidArgument(f"{path} has no requests; each line is one JSON request", param="input")
    return total


async def execute(
    run: BatchRun,
    *,
    on_progress: Callable[[Progress, RunView], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Progress:
    """Run the batch to its end (or until cancelled / a fatal error); every result is on disk as it finishes."""
    note = on_note or (lambda text: None)
    if (run.url is None) == (run.local is None):
        raise InvalidArgument("give either --url (a server to send to) or --local (a model to start), not both")
    model, launch = run.model, None
    if run.local is not None:  # the planner and the runner's supervisor: imported only for a local model
        from memserve.batch.local import LocalRunner, plan_local, served_name

        model = served_name(run.local, run.model)
    total = count_requests(run.input, model=model)
    if run.local is not None:
        launch = plan_local(
            run.local, concurrency=run.concurrency, context=run.context, memory=run.memory, headroom=run.headroom
        )
    view = RunView()
    state = "running"
    progress = Progress(total=total)
    last_write = 0.0

    def publish(current: Progress, *, force: bool = False) -> None:
        nonlocal last_write, progress
        progress = current
        if on_progress is not None:
            on_progress(current, view)
        now = time.monotonic()
        if force or now - last_write >= PROGRESS_WRITE_SECONDS:
            last_write = now
            with contextlib.suppress(OSError):  # progress is a convenience; the output files are the truth
                write_progress(run.output, _progress_json(run, current, view, state))

    with Checkpoint(run.output, run.errors_path) as checkpoint:
        if checkpoint.repaired_bytes:
            note(f"repaired {run.output}: cut {checkpoint.repaired_bytes} bytes of a half-written last line")
        if checkpoint.finished:
            note(f"resuming: {len(checkpoint.finished)} of {total} requests are done already")
        if checkpoint.retrying:
            note(
                f"retrying {checkpoint.retrying} requests that failed last time for a reason that may pass "
                f"(no answer, 429, 5xx): taken out of {checkpoint.errors}"
            )
        runner: LocalRunner | None = None
        supervisor: asyncio.Task[None] | None = None
        try:
            if launch is not None:
                assert model is not None
                plan = launch.plan
                note(f"starting {model}: {plan.rung}, {plan.dtype}, context {plan.context_tokens} × {plan.concurrency}")
                runner = LocalRunner(launch, name=model)
                local_runner = runner
                view.memory_bytes = local_runner.memory_bytes
                view.restarts = lambda: local_runner.restarts
                view.runner_pid = lambda: local_runner.pid
                view.peak_memory_bytes = lambda: local_runner.peak_memory_bytes
                await runner.start()
                note(f"{model} is ready ({runner.load_seconds or 0:.1f} s)")
                client = runner.client()
                supervisor = asyncio.create_task(runner.supervise(), name="batch-runner-supervisor")
            else:
                assert run.url is not None
                headers = {"Authorization": f"Bearer {run.api_key}"} if run.api_key else {}
                client = httpx.AsyncClient(
                    base_url=_base_url(run.url),
                    headers=headers,
                    timeout=httpx.Timeout(None, connect=10.0),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=run.concurrency),
                )
            async with client:
                work = asyncio.create_task(
                    run_requests(
                        read_requests_file(run.input, model=model, checked=True),  # by count_requests
                        checkpoint,
                        client,
                        total=total,
                        concurrency=run.concurrency,
                        retry=RetryPolicy(max_retries=run.max_retries, base_seconds=run.retry_base_seconds),
                        on_progress=publish,
                    ),
                    name="batch-requests",
                )
                try:
                    if supervisor is not None:
                        await asyncio.wait({work, supervisor}, return_when=asyncio.FIRST_COMPLETED)
                        if supervisor.done() and not work.done():
                            work.cancel()
                            supervisor.result()  # raises why the runner could not go on
                    final = await work
                finally:
                    work.cancel()
                    with contextlib.suppress(BaseException):
                        await work
            state = "completed"
            publish(final, force=True)
            return final
        except asyncio.CancelledError:
            state = "stopped"
            raise
        except BaseException as exc:
            state = "failed"
            progress.last_error = getattr(exc, "message", None) or str(exc)
            raise
        finally:
            if supervisor is not None:
                supervisor.cancel()
                with contextlib.suppress(BaseException):
                    await supervisor
            if runner is not None:
                await runner.aclose()
            if state != "completed":
                publish(progress, force=True)


def _base_url(url: str) -> str:
    from memserve.net import normalize_base_url

    return normalize_base_url(url)


def _progress_json(run: BatchRun, progress: Progress, view: RunView, state: str) -> dict[str, Any]:
    return {
        **progress.to_json(),
        "state": state,
        "pid": os.getpid(),
        "job_id": run.job_id,
        "input": str(run.input),
        "output": str(run.output),
        "errors": str(run.errors_path),
        "target": run.url or f"local:{run.local}",
        "runner_memory_bytes": view.memory_bytes() if view.memory_bytes else None,
        "runner_restarts": view.restarts() if view.restarts else None,
        "runner_pid": view.runner_pid() if view.runner_pid else None,
        "runner_peak_memory_bytes": view.peak_memory_bytes() if view.peak_memory_bytes else None,
        "updated_at": time.time(),
    }


__all__ = ["BatchRun", "RunView", "count_requests", "execute"]
