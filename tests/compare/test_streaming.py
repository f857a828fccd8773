"""The streaming transport against memserve's fake server, in process: the whole body a plain request
gets, timed by an injected clock; errors and cut streams become retryable 502s; the executor retries them."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.batch.checkpoint import Checkpoint
from memserve.batch.execute import RetryPolicy, run_requests
from memserve.batch.format import BatchRequest
from memserve.compare.streaming import TIMING_FIELD, StreamingTimer
from memserve.wire.fake import FakeOpenAI, Script
from tests.serving import serve_fake

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def client(fake: FakeOpenAI) -> httpx.AsyncClient:
    """Through 127.0.0.1 when the fake is served (a cut stream needs a real connection), else in process."""
    ticks = itertools.count(start=100.0, step=0.25)  # each clock read is 0.25 s after the last
    walls = itertools.count(start=1_000.0)
    inner = httpx.AsyncHTTPTransport() if fake.base_url else httpx.ASGITransport(app=fake)
    timer = StreamingTimer(inner, clock=lambda: next(ticks), wall=lambda: next(walls))
    return httpx.AsyncClient(base_url=fake.base_url.removesuffix("/v1") or "http://fake", transport=timer)


def post(fake: FakeOpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client(fake) as http:
            return await http.post(path, json=body)

    return asyncio.run(go())


def post_served(fake: FakeOpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    with serve_fake(fake) as served:
        return post(served, path, body)


def test_a_chat_answer_comes_back_whole_with_its_timings() -> None:
    fake = FakeOpenAI(models=("m",))
    response = post(fake, "/v1/chat/completions", CHAT)
    assert response.status_code == 200
    body = response.json()
    assert fake.requests[-1].body is not None and fake.requests[-1].body["stream"] is True
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    # clock reads: start 100.0, first token 100.25, end 100.5
    assert body[TIMING_FIELD] == {"ttft_seconds": 0.25, "e2e_seconds": 0.5, "started_at": 1000.0, "finished_at": 1001.0}


def test_a_completion_answer_comes_back_whole() -> None:
    fake = FakeOpenAI(models=("m",))
    response = post(fake, "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello from"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (Script(error_after_tokens=1), 502),  # an error event mid-stream: retryable
        (Script(error_status=429), 429),  # an error before the stream passes through as it is
        (Script(error_status=400), 400),
    ],
)
def test_failures_keep_or_become_a_retryable_status(script: Script, status: int) -> None:
    response = post_served(FakeOpenAI(models=("m",), script=script), "/v1/chat/completions", CHAT)
    assert response.status_code == status
    assert "error" in response.json()


def test_a_cut_stream_is_a_transport_error_as_no_answer_is() -> None:
    with pytest.raises(httpx.TransportError):  # the executor retries it as it retries no answer at all
        post_served(FakeOpenAI(models=("m",), script=Script(die_after_tokens=1)), "/v1/chat/completions", CHAT)


def test_the_executor_retries_a_cut_stream_and_records_the_timed_answer(tmp_path: Path) -> None:
    class CutOnce(FakeOpenAI):
        """Cuts the first stream, answers the rest."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            self.script = Script(die_after_tokens=1) if self.answers == 0 else Script()
            await super().__call__(scope, receive, send)

    cut_once = CutOnce(models=("m",))
    request = BatchRequest(line=1, custom_id="q1", method="POST", url="/v1/chat/completions", body=CHAT)

    async def go() -> None:
        async def no_wait(seconds: float) -> None:
            return None

        with Checkpoint(tmp_path / "out.jsonl") as checkpoint:
            async with client(served) as http:
                progress = await run_requests([request], checkpoint, http, total=1, retry=RetryPolicy(), sleep=no_wait)
        assert (progress.succeeded, progress.retries) == (1, 1)

    with serve_fake(cut_once) as served:
        asyncio.run(go())

    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "Hello from the"
    assert set(line["response"]["body"][TIMING_FIELD]) == {"ttft_seconds", "e2e_seconds", "started_at", "finished_at"}
