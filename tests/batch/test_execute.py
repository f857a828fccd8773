"""The executor against memserve's fake OpenAI server, in process: retries, backoff, Retry-After, errors file."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.batch.checkpoint import Checkpoint, OutputFull
from memserve.batch.execute import Progress, RetryPolicy, parse_retry_after, request_path, run_requests
from memserve.batch.format import BatchRequest
from memserve.wire.fake import FakeOpenAI, Script

Message = MutableMapping[str, Any]


class Scripted:
    """An ASGI app in front of a fake: a request whose prompt is in ``failures`` gets the next scripted fake's
    answer (an error), until its list is spent; then the healthy fake answers it."""

    def __init__(self, failures: dict[str, list[Script]]) -> None:
        self.healthy = FakeOpenAI(models=("m",))
        self.failures = failures
        self.tries: dict[str, int] = {}

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        prompt = json.loads(raw)["messages"][0]["content"]
        self.tries[prompt] = self.tries.get(prompt, 0) + 1
        pending = self.failures.get(prompt) or []
        app = FakeOpenAI(models=("m",), script=pending.pop(0)) if pending else self.healthy
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await app(scope, replay, send)


def requests(count: int) -> list[BatchRequest]:
    return [
        BatchRequest(
            line=i + 1,
            custom_id=f"q{i}",
            method="POST",
            url="/v1/chat/completions",
            body={"model": "m", "messages": [{"role": "user", "content": f"p{i}"}], "max_tokens": 3},
        )
        for i in range(count)
    ]


class Sleeps:
    """An injected sleep that records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def run(
    app: Any, out: Path, batch: list[BatchRequest], *, max_retries: int = 3, concurrency: int = 4
) -> tuple[Progress, Sleeps, Checkpoint]:
    sleeps = Sleeps()

    async def go() -> Progress:
        transport = app if isinstance(app, httpx.AsyncBaseTransport) else httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake/v1") as client:
            with Checkpoint(out) as checkpoint:
                return await run_requests(
                    batch,
                    checkpoint,
                    client,
                    total=len(batch),
                    concurrency=concurrency,
                    retry=RetryPolicy(max_retries=max_retries, base_seconds=1.0),
                    sleep=sleeps,
                    rng=random.Random(0),
                )

    progress = asyncio.run(go())
    return progress, sleeps, Checkpoint(out)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()] if path.exists() else []


def test_every_request_gets_one_output_line_in_openais_shape(tmp_path: Path) -> None:
    app = Scripted({})
    progress, sleeps, checkpoint = run(app, tmp_path / "out.jsonl", requests(20))
    lines = read(checkpoint.output)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"q{i}" for i in range(20))
    first = lines[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"]
    assert first["response"]["request_id"]  # the completion's id when no x-request-id came
    assert (progress.succeeded, progress.failed, progress.retries, progress.done) == (20, 0, 0, 20)
    assert progress.completion_tokens == 20 * 3
    assert sleeps.waits == []


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_failures_are_retried_with_backoff_until_they_pass(tmp_path: Path, status: int) -> None:
    app = Scripted({"p1": [Script(error_status=status)] * 3})
    progress, sleeps, checkpoint = run(app, tmp_path / "out.jsonl", requests(3), max_retries=3)
    assert app.tries["p1"] == 4 and app.tries["p0"] == 1
    assert progress.retries == 3 and progress.failed == 0
    assert len(read(checkpoint.output)) == 3 and read(checkpoint.errors) == []
    # exponential from 1 s, each with ±50 % jitter
    bounds = [(0.5, 1.5), (1, 3), (2, 6)]
    assert all(lo <= wait <= hi for wait, (lo, hi) in zip(sleeps.waits, bounds, strict=True)), sleeps.waits


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    app = Scripted({"p0": [Script(error_status=429, error_headers={"Retry-After": "7"})]})
    _, sleeps, _ = run(app, tmp_path / "out.jsonl", requests(1))
    assert sleeps.waits == [7.0]


def test_retries_spent_go_to_the_errors_file_and_the_rest_go_on(tmp_path: Path) -> None:
    app = Scripted({"p2": [Script(error_status=503)] * 10})
    progress, _, checkpoint = run(app, tmp_path / "out.jsonl", requests(5), max_retries=2)
    assert app.tries["p2"] == 3
    assert sorted(line["custom_id"] for line in read(checkpoint.output)) == ["q0", "q1", "q3", "q4"]
    [error] = read(checkpoint.errors)
    assert error["custom_id"] == "q2" and error["error"] is None
    assert error["response"]["status_code"] == 503
    assert error["response"]["body"]["error"]["code"] == "fake_failure"
    assert (progress.succeeded, progress.failed, progress.retries) == (4, 1, 2)


@pytest.mark.parametrize("status", [400, 404, 501])
def test_permanent_failures_are_not_retried(tmp_path: Path, status: int) -> None:
    app = Scripted({"p0": [Script(error_status=status)]})
    progress, sleeps, checkpoint = run(app, tmp_path / "out.jsonl", requests(2))
    assert app.tries["p0"] == 1 and sleeps.waits == []
    [error] = read(checkpoint.errors)
    assert error["response"]["status_code"] == status
    assert progress.failed == 1 and progress.succeeded == 1


def test_no_answer_at_all_is_retried_then_recorded_without_a_response(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    progress, sleeps, checkpoint = run(httpx.MockTransport(refuse), tmp_path / "out.jsonl", requests(1), max_retries=2)
    [error] = read(checkpoint.errors)
    assert error["response"] is None
    assert error["error"]["code"] == "upstream_unavailable"
    assert "after 3 tries" in error["error"]["message"]
    assert len(sleeps.waits) == 2 and progress.failed == 1


def test_a_second_run_skips_what_is_done_and_sends_only_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    batch = requests(10)
    run(Scripted({}), out, batch[:4])
    app = Scripted({})
    progress, _, checkpoint = run(app, out, batch)
    assert sorted(app.tries) == [f"p{i}" for i in range(4, 10)]
    assert progress.done_before == 4 and progress.succeeded == 6 and progress.done == 10
    assert sorted(line["custom_id"] for line in read(checkpoint.output)) == sorted(f"q{i}" for i in range(10))


def test_no_more_than_concurrency_requests_are_in_flight(tmp_path: Path) -> None:
    seen: list[int] = []

    def watch(progress: Progress) -> None:
        seen.append(progress.in_flight)

    async def go() -> None:
        fake = FakeOpenAI(models=("m",))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://fake") as client:
            with Checkpoint(tmp_path / "out.jsonl") as checkpoint:
                await run_requests(requests(30), checkpoint, client, total=30, concurrency=3, on_progress=watch)

    asyncio.run(go())
    assert max(seen) <= 3 and seen[-1] == 0


@pytest.mark.parametrize(
    ("url", "base", "path"),
    [
        ("/v1/chat/completions", "http://h:8000/v1", "/chat/completions"),
        ("/v1/chat/completions", "http://h:8000/v1/", "/chat/completions"),
        ("/v1/completions", "http://h:8000", "/v1/completions"),
    ],
)
def test_request_path_does_not_say_v1_twice(url: str, base: str, path: str) -> None:
    assert request_path(url, base) == path


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("0.5", 0.5),
        ("-2", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=1445412480.0) == seconds


def test_the_input_is_read_only_as_slots_free(tmp_path: Path) -> None:
    """Memory stays flat however long the file: a line is read when a request can start, not before."""
    pulled = 0
    batch = requests(40)

    def lines() -> Iterator[BatchRequest]:
        nonlocal pulled
        for request in batch:
            pulled += 1
            yield request

    ahead: list[int] = []

    def watch(progress: Progress) -> None:
        ahead.append(pulled - progress.done)

    async def go() -> None:
        fake = FakeOpenAI(models=("m",))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake), base_url="http://fake") as client:
            with Checkpoint(tmp_path / "out.jsonl") as checkpoint:
                await run_requests(lines(), checkpoint, client, total=40, concurrency=3, on_progress=watch)

    asyncio.run(go())
    assert pulled == 40
    # those in flight, those answered and not yet on disk (at most the concurrency: the writer's bound), and the
    # one read while waiting for a slot
    assert max(ahead) <= 3 + 3 + 1


def test_a_full_disk_stops_the_run_with_its_error_and_the_same_call_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    real = Checkpoint.record_many
    writes = 0

    def fill_up(self: Checkpoint, results: list[tuple[str, dict[str, Any], bool]]) -> None:
        nonlocal writes
        writes += 1
        if writes > 2:
            raise OutputFull("cannot write to out.jsonl: the disk is full")
        real(self, results)

    monkeypatch.setattr(Checkpoint, "record_many", fill_up)
    with pytest.raises(OutputFull, match="disk is full"):
        run(Scripted({}), out, requests(20))
    kept = [line["custom_id"] for line in read(out)]
    assert 1 <= len(kept) < 20 and len(kept) == len(set(kept))
    monkeypatch.undo()  # space freed
    app = Scripted({})
    progress, _, _ = run(app, out, requests(20))
    assert sorted(app.tries) == sorted(f"p{i}" for i in range(20) if f"q{i}" not in kept)
    assert sorted(line["custom_id"] for line in read(out)) == sorted(f"q{i}" for i in range(20))
    assert progress.done == 20
