"""``/v1/files`` and ``/v1/batches`` through the official openai client, against a gateway whose model is the fake
OpenAI server as a provider: a batch run to completed, bad files refused by line, a cancel that lets the requests in
flight finish (bounded by their timeout), transient failures retried, and keys that see only their own files and
jobs. The kill -9 test with a real runner is ``test_kill.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from memserve.batch.execute import RetryPolicy
from memserve.config import ProviderConfig
from memserve.gateway import batch_jobs
from memserve.gateway.app import create_app
from memserve.pool.pool import ModelPool
from memserve.wire.fake import FakeOpenAI, Script
from tests.batch_api.helpers import batch_lines, read_jsonl, upload, wait_for
from tests.gateway.test_gateway_process import GiB, host, settings_for
from tests.gateway.test_keys import ADMIN, keyed_gateway, new_key, usage_rows
from tests.serving import serve_app, serve_fake


@contextmanager
def gateway(tmp_path: Path, fake: FakeOpenAI, **settings_extra: Any) -> Iterator[openai.OpenAI]:
    settings = settings_for(
        tmp_path, [], providers=[ProviderConfig(name="fake", base_url=fake.base_url, models=["m1"])], **settings_extra
    )
    app = create_app(settings, ModelPool(settings, host(4 * GiB)))
    with (
        serve_app(app, lifespan=True) as origin,
        openai.OpenAI(base_url=f"{origin}/v1", api_key="-", max_retries=0) as client,
    ):
        yield client


@contextmanager
def _opened(gate: threading.Event) -> Iterator[None]:
    """Open ``gate`` on the way out, whatever happened: the fake's held answers end before it stops."""
    try:
        yield
    finally:
        gate.set()


def test_the_openai_client_runs_a_batch_to_completed(tmp_path: Path) -> None:
    ids = [f"q{i}" for i in range(20)]
    lines = batch_lines(ids, model="fake/m1")
    lines.insert(5, batch_lines(["nowhere-1"], model="fake/nothing")[0])  # no such model: a permanent 404
    lines.append(batch_lines(["nowhere-2"], model="fake/nothing")[0])
    with serve_fake(FakeOpenAI(models=("m1",))) as fake, gateway(tmp_path, fake) as client:
        uploaded = upload(client, lines)
        assert uploaded.purpose == "batch" and uploaded.bytes == len(b"".join(lines))
        assert client.files.retrieve(uploaded.id).filename == "input.jsonl"
        assert client.files.content(uploaded.id).content == b"".join(lines)
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "one"},
        )
        assert batch.status == "validating" and batch.metadata == {"run": "one"}
        done = wait_for(client, batch.id, {"completed", "failed", "cancelled", "expired"})
        assert done.status == "completed", done
        counts = done.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (22, 20, 2)
        times = [done.created_at, done.in_progress_at, done.finalizing_at, done.completed_at]
        assert all(t is not None for t in times) and times == sorted(times)  # type: ignore[type-var]
        assert done.output_file_id and done.error_file_id
        output = read_jsonl(client.files.content(done.output_file_id).content)
        assert [line["custom_id"] for line in output] == ids  # exactly once each, in the input's order
        assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
        assert output[0]["response"]["body"]["object"] == "chat.completion"
        assert all(line["id"].startswith("batch_req_") for line in output)
        errors = read_jsonl(client.files.content(done.error_file_id).content)
        assert [line["custom_id"] for line in errors] == ["nowhere-1", "nowhere-2"]
        assert {line["response"]["status_code"] for line in errors} == {404}
        assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        assert [b.id for b in client.batches.list()] == [batch.id]
        assert len(fake.requests) == 22  # each request ran once: the fake's 404 is permanent, never retried
        files = {f.id for f in client.files.list()}
        assert files == {uploaded.id, done.output_file_id, done.error_file_id}
        assert client.files.delete(uploaded.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)
    rows = usage_rows(tmp_path)  # the gateway's shutdown wrote them: one per request, the job its end user
    assert len(rows) == 22 and {r["end_user"] for r in rows} == {batch.id}
    assert sorted(r["status"] for r in rows) == [200] * 20 + [404] * 2


def test_a_bad_file_is_refused_with_its_line_numbers(tmp_path: Path) -> None:
    good = batch_lines(["a", "b", "c"], model="fake/m1")
    bad = [good[0], b"{not json\n", good[1], b'{"custom_id": "a", "method": "GET"}\n', good[2]]
    with serve_fake(FakeOpenAI(models=("m1",))) as fake, gateway(tmp_path, fake) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            upload(client, bad)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "invalid_batch_file"
        assert "line 2: not valid JSON" in error["message"] and "line 4: method must be 'POST'" in error["message"]
        assert "2 bad line(s) of 5" in error["message"]
        with pytest.raises(openai.BadRequestError, match="purpose"):
            client.files.create(file=("x.jsonl", b"".join(good)), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="no request"):
            upload(client, [b"\n"])
        as_json = httpx.post(  # a JSON body is no upload: it says how to send one
            f"{client.base_url}files", json={"purpose": "batch"}, headers={"authorization": f"Bearer {client.api_key}"}
        )
        assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]["message"]
        assert client.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-none", endpoint="/v1/chat/completions", completion_window="24h")
        # a line whose url is not the batch's endpoint fails the job at validation, with its line number
        mixed = upload(client, [good[0], *batch_lines(["t"], model="fake/m1", url="/v1/completions")])
        failed = wait_for(
            client,
            client.batches.create(input_file_id=mixed.id, endpoint="/v1/chat/completions", completion_window="24h").id,
            {"failed", "completed"},
        )
        assert failed.status == "failed" and failed.errors is not None and failed.errors.data
        assert failed.errors.data[0].line == 2 and "endpoint" in (failed.errors.data[0].message or "")
        assert failed.output_file_id is None and fake.requests == []


def _held_after(first: int) -> tuple[FakeOpenAI, threading.Event, Callable[[], int]]:
    """A fake whose first ``first`` answers come at once and the rest wait for the gate; and how many it got."""
    got = 0
    gate = threading.Event()

    async def sleep(seconds: float) -> None:
        nonlocal got
        got += 1
        while got > first and not gate.is_set():
            await asyncio.sleep(0.01)

    fake = FakeOpenAI(models=("m1",), script=Script(answer_delay_seconds=1.0), sleep=sleep)
    return fake, gate, lambda: got


def test_a_cancel_lets_the_requests_in_flight_finish_and_keeps_their_results(tmp_path: Path) -> None:
    """OpenAI's cancel: ``cancelling`` while the requests in flight finish, then ``cancelled`` with their results in
    the output; nothing new starts once it is cancelling."""
    fake, gate, got = _held_after(5)
    ids = [f"q{i}" for i in range(30)]
    with serve_fake(fake), gateway(tmp_path, fake) as client, _opened(gate):
        uploaded = upload(client, batch_lines(ids, model="fake/m1"))
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_for(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed == 5)
        with pytest.raises(openai.ConflictError, match="cancel it first"):
            client.files.delete(uploaded.id)  # a running batch reads it
        assert client.batches.cancel(batch.id).status == "cancelling"
        held = wait_for(client, batch.id, lambda b: got() > 5)  # requests in flight, held by the fake
        assert held.status == "cancelling" and held.request_counts is not None and held.request_counts.completed == 5
        assert client.batches.cancel(batch.id).status == "cancelling"  # cancelling again changes nothing
        gate.set()
        done = wait_for(client, batch.id, {"cancelled"})
        assert done.cancelling_at is not None and done.cancelled_at is not None
        counts = done.request_counts
        assert counts is not None and counts.total == 30 and counts.failed == 0
        assert 5 < counts.completed == got() < 30  # each request that reached the fake finished, and no other ran
        assert done.output_file_id is not None and done.error_file_id is None
        output = read_jsonl(client.files.content(done.output_file_id).content)
        assert len(output) == len({line["custom_id"] for line in output}) == counts.completed
        assert all(line["response"]["status_code"] == 200 for line in output)
        assert client.batches.cancel(batch.id).status == "cancelled"


def test_a_cancel_waits_no_longer_than_the_requests_own_timeout(tmp_path: Path) -> None:
    """Requests that never answer are cut ``request_timeout_seconds`` after the cancel: the batch is ``cancelled``
    with only what had finished, and the cut requests are in neither file."""
    fake, gate, got = _held_after(5)
    ids = [f"q{i}" for i in range(30)]
    with serve_fake(fake), gateway(tmp_path, fake, request_timeout_seconds=1) as client, _opened(gate):
        uploaded = upload(client, batch_lines(ids, model="fake/m1"))
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_for(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed == 5)
        client.batches.cancel(batch.id)
        done = wait_for(client, batch.id, {"cancelled"})  # the gate never opened: the held requests were cut
        assert not gate.is_set() and got() > 5
        counts = done.request_counts
        assert counts is not None and (counts.completed, counts.failed) == (5, 0)
        assert done.output_file_id is not None and done.error_file_id is None
        assert len(read_jsonl(client.files.content(done.output_file_id).content)) == 5


@pytest.mark.parametrize(("status", "retries"), [(503, 1000), (429, 1)])
def test_transient_failures_are_retried_until_they_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, retries: int
) -> None:
    """A 503 while retries last; a 429 (a limit) without spending them: one retry each, and 20 tries made."""
    monkeypatch.setattr(
        batch_jobs, "RetryPolicy", lambda: RetryPolicy(max_retries=retries, base_seconds=0.001, max_seconds=0.01)
    )
    monkeypatch.setattr(batch_jobs, "_LIMITED_BACKOFF_STEPS", 1)
    fake = FakeOpenAI(models=("m1",), script=Script(error_status=status, error_headers={"Retry-After": "0"}))
    ids = [f"q{i}" for i in range(6)]
    with serve_fake(fake), gateway(tmp_path, fake) as client:
        uploaded = upload(client, batch_lines(ids, model="fake/m1"))
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while len(fake.requests) < 20:  # every request has failed, most of them more than once
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fake.script = Script()  # the provider is back
        done = wait_for(client, batch.id, {"completed", "failed"})
        counts = done.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (6, 6, 0)
        assert done.output_file_id is not None and done.error_file_id is None
        output = read_jsonl(client.files.content(done.output_file_id).content)
        assert sorted(line["custom_id"] for line in output) == ids


def test_a_key_sees_only_its_own_files_and_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with keyed_gateway(tmp_path, monkeypatch) as (origin, _fake):
        alice_key, bob_key = new_key(origin, "alice"), new_key(origin, "bob")
        alice = openai.OpenAI(base_url=f"{origin}/v1", api_key=alice_key, max_retries=0)
        bob = openai.OpenAI(base_url=f"{origin}/v1", api_key=bob_key, max_retries=0)
        admin = openai.OpenAI(base_url=f"{origin}/v1", api_key=ADMIN, max_retries=0)
        uploaded = upload(alice, batch_lines(["a", "b"], model="fake/m1"))
        batch = alice.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(alice, batch.id, {"completed", "failed"})
        assert done.status == "completed" and done.output_file_id is not None
        for attempt in (
            lambda: bob.files.retrieve(uploaded.id),
            lambda: bob.files.content(done.output_file_id or ""),
            lambda: bob.files.delete(uploaded.id),
            lambda: bob.batches.retrieve(batch.id),
            lambda: bob.batches.cancel(batch.id),
            lambda: bob.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert bob.batches.list().data == [] and bob.files.list().data == []
        assert [b.id for b in alice.batches.list()] == [batch.id]
        assert [b.id for b in admin.batches.list()] == [batch.id]  # an admin sees every job
        assert admin.batches.retrieve(batch.id).status == "completed"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{origin}/v1", api_key="ms-nobody", max_retries=0).batches.list()
        with pytest.raises(openai.ConflictError):
            alice.batches.cancel(batch.id)  # finished: nothing to cancel
    rows = [r for r in usage_rows(tmp_path) if r["end_user"] == batch.id]
    assert len(rows) == 2 and {r["key_name"] for r in rows} == {"alice"}  # metered to the job's key


def test_a_request_that_keeps_failing_goes_to_the_errors_file_after_its_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        batch_jobs, "RetryPolicy", lambda: RetryPolicy(max_retries=2, base_seconds=0.001, max_seconds=0.01)
    )
    fake = FakeOpenAI(models=("m1",), script=Script(error_status=500))  # a model that fails every time
    ids = ["a", "b", "c"]
    with serve_fake(fake), gateway(tmp_path, fake) as client:
        uploaded = upload(client, batch_lines(ids, model="fake/m1"))
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(client, batch.id, {"completed", "failed"})
        counts = done.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (3, 0, 3)
        assert done.status == "completed" and done.output_file_id is None and done.error_file_id is not None
        errors = read_jsonl(client.files.content(done.error_file_id).content)
        assert [line["custom_id"] for line in errors] == ids
        assert {line["response"]["status_code"] for line in errors} == {500}  # the provider's answer, relayed
        assert len(fake.requests) == 3 * 3  # the first try and two retries each
