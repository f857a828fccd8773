"""A scripted Engine for HTTP tests: no model, exact token ids, and a record of every sequence's fate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from memserve.errors import GenerationFailed
from memserve.memory.estimate import DeviceNeed
from memserve.memory.planner import Plan
from memserve.wire.events import EngineStats, FinishReason, GenerationRequest, QueueFull, TokenEvent


class FakeEngine:
    """Yields ``tokens`` (up to ``max_new_tokens``, ending after a stop token id) with optional delays.

    The last scripted token ends the sequence with "stop", as an eos would. ``queue_full`` raises
    QueueFull before the first event; ``fail_after`` raises RuntimeError after that many events.
    ``open`` holds the sequences whose iterator is suspended, neither finished nor closed;
    ``closed_early`` those closed (or cancelled) before the engine finished them.
    Like the real engines, ``close`` (counted in ``close_calls``) makes sequences still in flight fail with
    GenerationFailed at their next token, and new ones fail at once.
    """

    name = "fake"

    def __init__(
        self,
        tokens: Sequence[int] = (),
        *,
        delay_seconds: float = 0.0,
        first_delay_seconds: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self.tokens = list(tokens)
        self.delay_seconds = delay_seconds
        self.first_delay_seconds = first_delay_seconds
        self.fail_after = fail_after
        self.queue_full = False
        self.queue_full_on_call = False
        self.requests: list[GenerationRequest] = []
        self.open: set[str] = set()
        self.closed_early: list[str] = []
        self.yielded = 0
        self.close_calls = 0

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.queue_full_on_call:  # an engine may also refuse before returning an iterator
            raise QueueFull(running=2, waiting=8, retry_after_seconds=2.5)
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.close_calls:
            raise GenerationFailed("the engine is closed", code="engine_closed")
        if self.queue_full:
            raise QueueFull(running=2, waiting=8, retry_after_seconds=2.5)
        self.requests.append(request)
        self.open.add(request.request_id)
        try:
            await asyncio.sleep(self.first_delay_seconds)
            for index, token_id in enumerate(self.tokens[: request.max_new_tokens]):
                if index:
                    await asyncio.sleep(self.delay_seconds)
                if self.close_calls:
                    raise GenerationFailed(f"generation of {request.request_id!r} failed: the engine was closed")
                if index == self.fail_after:
                    raise RuntimeError("the fake engine broke down")
                reason = _finish_reason(token_id, index, request, len(self.tokens))
                self.yielded += 1
                yield TokenEvent(request.request_id, token_id, index, reason)
                if reason:
                    break
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early.append(request.request_id)
            raise
        finally:  # runs when the sequence ends, fails or is closed; never if it is left suspended
            self.open.discard(request.request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.open), waiting=0, prompt_tokens_total=17, requests_total=3)

    async def close(self) -> None:
        self.close_calls += 1


def _finish_reason(token_id: int, index: int, request: GenerationRequest, scripted: int) -> FinishReason | None:
    if token_id in request.stop_token_ids:
        return "stop"
    if index + 1 == request.max_new_tokens:
        return "length"
    return "stop" if index + 1 == scripted else None


def cpu_plan(
    dtype: str = "float32",
    *,
    context_tokens: int = 256,
    concurrency: int = 1,
    max_batch_tokens: int = 128,
    devices: dict[str, DeviceNeed] | None = None,
) -> Plan:
    """A whole-model plan on the CPU, unquantized, for tests that load or serve a demo model directly."""
    return Plan(
        "cpu",
        dtype,
        "none",
        context_tokens=context_tokens,
        concurrency=concurrency,
        max_batch_tokens=max_batch_tokens,
        devices=devices or {},
        device_map={"": "cpu"},
    )
