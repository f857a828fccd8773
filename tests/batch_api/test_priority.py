"""Batch work yields to interactive work: a job never holds a local model's last slot, and keeps to one slot while
interactive requests come."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai

from memserve.config import ModelConfig, ProviderConfig
from memserve.gateway.app import create_app
from memserve.gateway.batch_jobs import INTERACTIVE_SECONDS, PROVIDER_SLOTS, BatchJobs, Slots
from memserve.pool.pool import ModelPool
from tests.batch_api.helpers import batch_lines, read_jsonl, upload, wait_for
from tests.gateway.test_gateway_process import GiB, host, settings_for
from tests.serving import serve_app


def _model(name: str, source: Path, concurrency: int) -> ModelConfig:
    return ModelConfig(name=name, source=str(source), context_tokens=256, concurrency=concurrency)


def test_slots_never_let_more_than_the_limit_in() -> None:
    async def run() -> Slots:
        slots = Slots(lambda model: 3)

        async def one() -> None:
            await slots.take("m")
            for _ in range(3):
                await asyncio.sleep(0)
            await slots.give("m")

        await asyncio.gather(*(one() for _ in range(10)))
        return slots

    slots = asyncio.run(run())
    assert slots.high_water == {"m": 3} and slots.in_flight == {"m": 0}


def test_a_model_keeps_one_slot_for_interactive_requests(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = settings_for(
        tmp_path,
        [_model("one", tiny_model_dir, 1), _model("three", tiny_model_dir, 3)],
        providers=[ProviderConfig(name="fake", base_url="http://127.0.0.1:9/v1", models=["m1"])],
    )
    jobs = BatchJobs(settings, ModelPool(settings, host(4 * GiB)), generate=None)  # type: ignore[arg-type]
    assert [jobs.model_slots(m) for m in ("one", "three", "fake/m1")] == [1, 2, PROVIDER_SLOTS]
    jobs.interactive("three")  # interactive traffic: its batches keep to one slot
    assert [jobs.model_slots(m) for m in ("one", "three", "fake/m1")] == [1, 1, PROVIDER_SLOTS]
    jobs.interactive_at["three"] = time.monotonic() - INTERACTIVE_SECONDS - 1  # quiet long enough: two again
    assert jobs.model_slots("three") == 2


def test_a_saturating_batch_leaves_the_last_slot_and_an_interactive_request_gets_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = settings_for(tmp_path, [_model("demo", tiny_model_dir, 3)])
    pool = ModelPool(settings, host(4 * GiB))
    app = create_app(settings, pool)
    ids = [f"q{i}" for i in range(48)]  # work left for the batch after the interactive request
    samples: list[tuple[int, bool]] = []  # (the runner's leases, an interactive request in flight)
    batch_in_flight: list[tuple[int, float]] = []  # (batch requests in flight, read before this monotonic time)
    sampling, interactive_in_flight = threading.Event(), threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append((pool.entries["demo"].leases, interactive_in_flight.is_set()))
            jobs = getattr(app.app.state, "batch_jobs", None)  # type: ignore[attr-defined]
            if jobs is not None:
                batch_in_flight.append((jobs.slots.in_flight.get("demo", 0), time.monotonic()))
            sampling.wait(0.005)

    with serve_app(app, lifespan=True) as origin, openai.OpenAI(base_url=f"{origin}/v1", api_key="-") as client:
        uploaded = upload(client, batch_lines(ids, model="demo", url="/v1/completions", max_tokens=12))
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            wait_for(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 2)
            interactive_in_flight.set()
            interactive = httpx.post(
                f"{origin}/v1/completions",
                json={"model": "demo", "prompt": "hello", "max_tokens": 4, "temperature": 0},
                timeout=120,
            )
            interactive_in_flight.clear()
            assert interactive.status_code == 200, interactive.text
            done = wait_for(client, batch.id, {"completed", "failed"})
        finally:
            sampling.set()
            sampler.join()
        assert done.status == "completed" and done.output_file_id is not None
        assert len(read_jsonl(client.files.content(done.output_file_id).content)) == len(ids)
    jobs: BatchJobs = app.app.state.batch_jobs  # type: ignore[attr-defined]
    assert jobs.slots.high_water == {"demo": 2}  # saturated: two batch requests at once, never the third slot
    assert {leases for leases, interactive in samples if not interactive} <= {0, 1, 2}  # the batch's alone
    assert 2 in {leases for leases, _ in samples}
    # once the interactive request started, the batch took no second slot for INTERACTIVE_SECONDS: the two it held
    # ran out, and from then on it held at most one (it still had work: it did hold one)
    started = jobs.interactive_at["demo"]
    window = [n for n, t in batch_in_flight if started <= t < started + INTERACTIVE_SECONDS]
    after = window[next(i for i, n in enumerate(window) if n <= 1) :]
    assert after and max(after) <= 1 and 1 in after, window
