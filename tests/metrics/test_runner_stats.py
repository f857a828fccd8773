"""The figures a runner pushes for ``/metrics``: the ``stats`` line, when it is pushed, and KV pages in use."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from memserve.runner.batching import ContinuousBatchingEngine
from memserve.runner.serve import report_stats
from memserve.wire.events import EngineStats, GenerationRequest, Stats, runner_event_from_json
from tests.runner.test_engine import _load, _prompts


def test_the_stats_line_reads_back_and_refuses_what_is_not_a_count() -> None:
    stats = Stats(running=2, waiting=1, kv_cache_blocks=64, kv_cache_blocks_used=9)
    assert runner_event_from_json(stats.to_json()) == stats
    assert runner_event_from_json({"event": "stats", "running": 0, "waiting": 0}) == Stats(0, 0)
    with pytest.raises(ValueError, match="'running' must be a count"):
        runner_event_from_json({"event": "stats", "running": -1, "waiting": 0})
    engine = EngineStats(running=1, waiting=0, extra={"kv_cache_blocks": 8, "kv_cache_blocks_used": 2, "page_size": 64})
    assert Stats.of(engine) == Stats(1, 0, 8, 2)
    assert Stats.of(EngineStats(extra={"generate_calls_total": 3})) == Stats(0, 0, None, None)


def test_figures_are_pushed_at_once_then_when_they_change() -> None:
    figures = [EngineStats(running=1), EngineStats(running=1), EngineStats(running=2), EngineStats(running=2)]
    pushed: list[Stats] = []
    stop = threading.Event()

    def stats() -> EngineStats:
        if len(figures) == 1:
            stop.set()  # the last look
        return figures.pop(0)

    report_stats(stats, stop, interval_seconds=0, every_seconds=3600, push=pushed.append)
    assert pushed == [Stats(1, 0), Stats(2, 0)]


def test_unchanged_figures_are_pushed_again_after_every_seconds() -> None:
    looks, pushed, stop = [0], [], threading.Event()

    def stats() -> EngineStats:
        looks[0] += 1
        if looks[0] == 3:
            stop.set()
        return EngineStats(running=1)

    report_stats(stats, stop, interval_seconds=0, every_seconds=0, push=pushed.append)
    assert pushed == [Stats(1, 0)] * 3


def test_an_engine_that_fails_to_answer_is_skipped_not_fatal() -> None:
    pushed, stop = [], threading.Event()

    def stats() -> EngineStats:
        stop.set()
        raise RuntimeError("closing")

    report_stats(stats, stop, interval_seconds=0, push=pushed.append)
    assert pushed == []


def test_kv_pages_in_use_rise_with_a_sequence_and_fall_after(tiny_model_dir: Path) -> None:
    """A private part of transformers (``PagedAttentionCache.compute_free_capacity``): see runner/batching.py."""
    model, prompt = _load(tiny_model_dir), _prompts(tiny_model_dir)[1]
    engine = ContinuousBatchingEngine(
        model, max_sequences=1, max_queue=0, max_context_tokens=1024, max_batch_tokens=256
    )

    def used() -> int:
        value = engine.stats().extra.get("kv_cache_blocks_used")
        assert isinstance(value, int)
        return value

    async def scenario() -> None:
        assert used() == 0 and engine.stats().extra["kv_cache_blocks"] > 0
        request = GenerationRequest("r", prompt, max_new_tokens=600, stop_token_ids=(-1,))
        stream = engine.generate(request)
        seen = 0
        async for event in stream:
            seen = max(seen, used())
            if event.index >= 300:
                break
        assert seen >= 1 + (len(prompt) + 300) // engine.stats().extra["page_size"] - 1
        await stream.aclose()
        deadline = asyncio.get_running_loop().time() + 30
        while used() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert used() == 0

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.close())
