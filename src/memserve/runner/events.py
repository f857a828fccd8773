"""Records that flow out of an engine: HTTP, CLI, metrics and usage all read the same ones."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from memserve.wire.schema import FinishReason


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Token ids in, token ids out; text is the HTTP layer's business."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # eos and friends: generation ends *after* emitting one


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; the last event of a sequence carries ``finish_reason``."""

    request_id: str
    token_id: int
    index: int  # 0-based position in the completion
    finish_reason: FinishReason | None = None
    # seconds since the request was accepted by the engine (TTFT is the first event's value)
    elapsed_seconds: float = 0.0


@dataclass
class EngineStats:
    """What ``GET /stats`` reports."""

    running: int = 0
    waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class QueueFull(Exception):
    """The engine holds its maximum of running and waiting sequences; the caller should retry later."""

    def __init__(self, running: int, waiting: int, retry_after_seconds: float = 1.0) -> None:
        super().__init__(f"{running} sequences running and {waiting} waiting, the most this plan allows")
        self.running = running
        self.waiting = waiting
        self.retry_after_seconds = retry_after_seconds


class Engine(Protocol):
    """A generation engine owning one loaded model.

    ``generate`` yields TokenEvents as they are produced. Closing the iterator early (the client went
    away) must free the sequence at once. ``generate`` raises QueueFull *before* yielding anything
    when the bounded queue is full.
    """

    name: str  # "continuous-batching" or "generate"

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...
