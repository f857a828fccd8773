"""Dynamic batching by token budget, with a fake forward: no model, no torch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from memserve.errors import GenerationFailed
from memserve.runner.encoder_batch import EncoderBatcher, padded_tokens
from memserve.wire.events import QueueFull


class Recorder:
    """A forward that records its batches and answers each row with its length; the first call waits for
    ``release`` so that requests sent meanwhile gather."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, rows: list[list[int]], adapters: list[str | None]) -> list[int]:
        self.batches.append(rows)
        self.started.set()
        self.release.wait(60)
        if any(r and r[0] == -1 for r in rows):
            raise RuntimeError("boom")
        return [len(r) for r in rows]


def test_concurrent_requests_share_forwards_within_the_budget() -> None:
    async def scenario() -> None:
        forward = Recorder()
        engine = EncoderBatcher(forward, max_batch_tokens=12, max_requests=64)
        first = asyncio.create_task(engine.run([[1, 2]]))
        await asyncio.to_thread(forward.started.wait, 10)  # the worker is busy with the first request
        others = [asyncio.create_task(engine.run([[1] * n, [2] * n])) for n in (1, 2, 3, 4)]
        while engine.stats().waiting < 8:
            await asyncio.sleep(0.01)
        forward.release.set()
        assert await first == [2]
        assert [await o for o in others] == [[1, 1], [2, 2], [3, 3], [4, 4]]
        await engine.close()
        shapes = [[len(r) for r in batch] for batch in forward.batches]
        assert shapes == [[2], [1, 1, 2, 2], [3, 3, 4], [4]]  # in order, rows × longest within 12
        assert all(padded_tokens(s) <= 12 for s in shapes)
        assert engine.stats().extra["largest_batch_inputs"] == 4

    asyncio.run(scenario())


def test_an_input_longer_than_the_budget_runs_alone() -> None:
    async def scenario() -> None:
        forward = Recorder()
        forward.release.set()
        engine = EncoderBatcher(forward, max_batch_tokens=4, max_requests=4)
        assert await engine.run([[1] * 9]) == [9]
        await engine.close()

    asyncio.run(scenario())


def test_a_full_engine_refuses_before_queueing() -> None:
    async def scenario() -> None:
        forward = Recorder()
        engine = EncoderBatcher(forward, max_batch_tokens=100, max_requests=1)
        first = asyncio.create_task(engine.run([[1]]))
        await asyncio.to_thread(forward.started.wait, 10)
        with pytest.raises(QueueFull):
            await engine.run([[2]])
        forward.release.set()
        assert await first == [1]
        await engine.close()

    asyncio.run(scenario())


def test_a_failed_forward_fails_its_requests_and_the_worker_serves_on() -> None:
    async def scenario() -> None:
        forward = Recorder()
        forward.release.set()
        engine = EncoderBatcher(forward, max_batch_tokens=100, max_requests=4)
        with pytest.raises(GenerationFailed, match="RuntimeError: boom"):
            await engine.run([[-1]])
        assert await engine.run([[1, 2, 3]]) == [3]
        await engine.close()

    asyncio.run(scenario())


def test_inputs_of_a_request_that_went_away_are_not_run() -> None:
    async def scenario() -> None:
        forward = Recorder()
        engine = EncoderBatcher(forward, max_batch_tokens=100, max_requests=4)
        first = asyncio.create_task(engine.run([[1]]))
        await asyncio.to_thread(forward.started.wait, 10)
        gone = asyncio.create_task(engine.run([[7, 7, 7]]))
        while engine.stats().waiting < 1:
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        forward.release.set()
        assert await first == [1]
        assert await engine.run([[5]]) == [1]
        await engine.close()
        assert [7, 7, 7] not in [row for batch in forward.batches for row in batch]

    asyncio.run(scenario())


def test_close_fails_what_still_waits() -> None:
    async def scenario() -> None:
        forward = Recorder()
        engine = EncoderBatcher(forward, max_batch_tokens=100, max_requests=4)
        first = asyncio.create_task(engine.run([[1]]))
        await asyncio.to_thread(forward.started.wait, 10)
        waiting = asyncio.create_task(engine.run([[2]]))
        while engine.stats().waiting < 1:
            await asyncio.sleep(0.01)
        closing = asyncio.create_task(engine.close())
        with pytest.raises(GenerationFailed, match="shut down"):
            await waiting
        forward.release.set()
        await closing
        assert await first == [1]

    asyncio.run(scenario())


def test_work_on_the_worker_runs_between_forwards_before_waiting_inputs() -> None:
    async def scenario() -> None:
        forward = Recorder()
        engine = EncoderBatcher(forward, max_batch_tokens=64, max_requests=64)
        first = asyncio.create_task(engine.run([[1]]))
        await asyncio.to_thread(forward.started.wait, 10)  # a forward is running
        waiting = asyncio.create_task(engine.run([[2, 2]]))
        while engine.stats().waiting < 1:
            await asyncio.sleep(0.01)
        seen: list[tuple[str, int]] = []

        def change() -> str:
            seen.append((threading.current_thread().name, len(forward.batches)))
            return "changed"

        changing = asyncio.create_task(engine.on_worker(change))
        await asyncio.sleep(0.05)
        assert not changing.done()  # never beside a forward
        forward.release.set()
        assert await changing == "changed" and await first == [1] and await waiting == [2]
        # on the model's thread, after the running forward and before the input that waited
        assert seen == [("memserve-encoder", 1)] and len(forward.batches) == 2

        def fail() -> None:
            raise ValueError("bad adapter")

        with pytest.raises(ValueError, match="bad adapter"):
            await engine.on_worker(fail)
        assert await engine.run([[3]]) == [1]  # the worker serves on
        await engine.close()

    asyncio.run(scenario())
