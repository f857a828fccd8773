"""The async front both generation engines share (:class:`EngineBase`): it runs on the event loop.

Validation, the bound on running and waiting sequences (``QueueFull``), streaming token events,
cancellation when the consumer goes away, and the stats are written once here; an engine
(``runner/batching.py``, ``runner/fallback.py``) only starts a job on its generation thread, stops one
early and shuts its thread down. Generation threads reach the front only through
``loop.call_soon_threadsafe``, so its state needs no lock. One event loop should drive an engine at a time.

The prompt of the worst-case warm-up, which both engines run the same way, is built here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig

from memserve.errors import GenerationFailed, InvalidArgument, ModelNotFound
from memserve.wire.events import EngineStats, FinishReason, GenerationRequest, QueueFull, TokenEvent

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from memserve.runner.lora import LoraBank

__all__ = [
    "STOP_TIMEOUT_SECONDS",
    "WARMUP_REQUEST",
    "Chunk",
    "EngineBase",
    "Job",
    "check_positive",
    "eos_ids",
    "filler_prompt",
    "worst_case_prompt_tokens",
]

WARMUP_REQUEST = GenerationRequest(request_id="memserve-warmup", prompt_ids=(0,), max_new_tokens=1)
STOP_TIMEOUT_SECONDS = 30.0


def filler_prompt(tokens: int, vocab_size: int, avoid: tuple[int, ...]) -> list[int]:
    """``tokens`` ordinary token ids (no stop token), for a warm-up that fills a context."""
    ids = [t for t in range(min(vocab_size, 4096)) if t not in avoid][3:] or [0]
    return [ids[i % len(ids)] for i in range(max(1, tokens))]


def worst_case_prompt_tokens(model: Any, context_tokens: int, max_batch_tokens: int | None) -> int:
    """The prompt of the worst-case warm-up: one whole prefill chunk (``max_batch_tokens``, or the context
    if smaller), the largest forward a request causes. With sdpa, a later chunk of a longer prompt costs
    about as much (the kernel works in blocks; its gathered K/V is priced by the estimate), so one chunk
    is measured, not the whole context: the warm-up then costs one forward, as vLLM's profiling run does.
    Eager attention materialises ``chunk × (past + chunk)`` scores per head, growing with the past, so
    there the prompt fills the context and its last chunk attends to all of it."""
    whole = max(1, context_tokens - 1)
    attention = str(getattr(model.config, "_attn_implementation", "") or "")
    if "eager" in attention or max_batch_tokens is None:
        return whole
    return min(whole, max_batch_tokens)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {value}", param=name)


def eos_ids(config: GenerationConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    if isinstance(eos, int):
        return (eos,) if eos >= 0 else ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(t) for t in eos if int(t) >= 0)
    return ()


# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """What a generation thread hands the event loop: new tokens, and whether (or how) it ended."""

    tokens: list[int]
    finished: bool = False
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One accepted request, as the event loop and the generation thread both see it."""

    request: GenerationRequest
    key: str  # unique inside the engine: callers may reuse request ids
    loop: asyncio.AbstractEventLoop
    stop_ids: frozenset[int]
    accepted_at: float
    chunks: asyncio.Queue[Chunk] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    holds_slot: bool = False
    done: bool = False  # the engine delivered its last chunk
    received: int = 0  # tokens already taken from the library's cumulative outputs
    slot: int = -1  # its LoRA adapter's slot in the engine's LoraBank (runner/lora.py); -1: the base alone


class EngineBase:
    """Validation, the running/waiting bound, streaming, cancellation and stats.

    State is touched on the event loop only; generation threads reach it through
    ``loop.call_soon_threadsafe(self._deliver, ...)``. Subclasses start a job (``_submit``, called
    once the job holds a running slot) and stop one early (``_cancel``).
    """

    name = "engine"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_running: int,
        max_sequences: int,
        max_queue: int,
        max_context_tokens: int | None,
        generation_config: GenerationConfig | None,
    ) -> None:
        check_positive(max_sequences=max_sequences)
        if max_queue < 0:
            raise InvalidArgument(f"max_queue must be 0 or more, got {max_queue}", param="max_queue")
        self.model = model
        self.max_sequences = max_sequences
        self.max_queue = max_queue
        self.max_context_tokens = max_context_tokens
        self._max_running = max_running
        base = generation_config if generation_config is not None else model.generation_config
        self._base_config = copy.deepcopy(base) if base is not None else GenerationConfig()
        self._default_stop_ids = eos_ids(self._base_config)
        embeddings = model.get_input_embeddings()
        self._vocab_size = int(getattr(embeddings, "num_embeddings", 0) or model.config.vocab_size)
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._keys = itertools.count()
        self._closed = False
        self._failure: str | None = None
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._requests_total = 0
        self._rejected_total = 0
        self.lora: LoraBank | None = None

    def attach_lora(self, bank: LoraBank) -> None:
        """Serve the adapters of ``bank`` (wrapped into this engine's model) beside the base."""
        self.lora = bank

    # -- the protocol ----------------------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why this engine can no longer generate (its thread died), or None while it is healthy."""
        return self._failure

    def stats(self) -> EngineStats:
        """Running and waiting sequences now, token and request totals since start."""
        return EngineStats(
            running=self._running,
            waiting=len(self._waiters),
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            requests_total=self._requests_total,
            extra={"rejected_total": self._rejected_total, **self._extra_stats()},
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Yield the request's tokens as they are produced; the last event carries ``finish_reason``.

        Raises InvalidArgument, ModelNotFound (an adapter that is not loaded) or QueueFull before yielding
        anything. Leaving early (``aclose``, a cancelled task) cancels the sequence at once and frees its slot
        and cache pages. A request on an adapter holds it until its sequence ends, so an adapter removed
        meanwhile keeps its weights until then.
        """
        self._validate(request)
        if request.adapter is not None and self.lora is None:
            raise ModelNotFound(
                f"this runner has no LoRA adapters, so none named {request.adapter}; ask for the base model",
                param="model",
            )
        if self._closed:
            raise GenerationFailed("the engine is closed", code="engine_closed")
        if self._failure is not None:
            raise GenerationFailed(self._failure, code="engine_failed")
        if self._running + len(self._waiters) >= self.max_sequences + self.max_queue:
            self._rejected_total += 1
            raise QueueFull(self._running, len(self._waiters))
        slot = self.lora.acquire(request.adapter) if self.lora is not None and request.adapter is not None else -1
        job = Job(
            request=request,
            key=f"{request.request_id}#{next(self._keys)}",
            loop=asyncio.get_running_loop(),
            stop_ids=frozenset(t for t in request.stop_token_ids or self._default_stop_ids if t >= 0),
            accepted_at=time.perf_counter(),
            slot=slot,
        )
        self._requests_total += 1
        try:
            await self._acquire_slot(job)
            self._prompt_tokens_total += len(request.prompt_ids)
            self._submit(job)
            index = 0
            while True:
                chunk = await job.chunks.get()
                if chunk.error is not None:
                    raise GenerationFailed(f"generation of {request.request_id!r} failed: {chunk.error}")
                for position, token in enumerate(chunk.tokens):
                    last_of_chunk = chunk.finished and position == len(chunk.tokens) - 1
                    yield TokenEvent(
                        request_id=request.request_id,
                        token_id=token,
                        index=index,
                        finish_reason=self._finish_reason(job, token, index, last_of_chunk),
                        elapsed_seconds=time.perf_counter() - job.accepted_at,
                    )
                    index += 1
                if chunk.finished:
                    return
        finally:
            if not job.done:
                job.done = True
                job.cancelled.set()
                if job.holds_slot:
                    self._cancel(job)
                self._release_slot(job)
            if slot != -1 and self.lora is not None:
                self.lora.release(slot)

    async def close(self) -> None:
        """Stop the generation thread; sequences still in flight or waiting fail with GenerationFailed."""
        if self._closed:
            return
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(GenerationFailed("the engine was closed", code="engine_closed"))
        await asyncio.to_thread(self._shutdown)
        self._fail_all("the engine was closed")

    # -- for subclasses --------------------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        raise NotImplementedError

    def _cancel(self, job: Job) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Stop the generation thread (runs in a worker thread: it may block)."""
        raise NotImplementedError

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def _jobs_in_flight(self) -> list[Job]:
        raise NotImplementedError

    def _forget(self, job: Job) -> None:
        """Drop the job from the routing table of the generation thread, if the engine has one."""

    def _deliver(self, job: Job, tokens: list[int], finished: bool = False, error: str | None = None) -> None:
        """On the loop: hand a chunk to the job's consumer; free the slot as soon as the sequence ends."""
        if job.done:
            return
        self._generation_tokens_total += len(tokens)
        if finished or error is not None:
            job.done = True
            self._forget(job)
            self._release_slot(job)
        job.chunks.put_nowait(Chunk(tokens, finished or error is not None, error))

    def _post(self, job: Job, callback: Callable[..., None], *args: Any) -> None:
        """From any thread: run ``callback(*args)`` on the job's loop; a closed loop means nobody listens."""
        try:
            job.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the consumer is gone, stop the sequence
            job.cancelled.set()

    def _fail_all(self, reason: str) -> None:
        """From any thread: end every job in flight with ``reason``."""
        for job in self._jobs_in_flight():
            self._post(job, self._deliver, job, [], True, reason)

    # -- internals -------------------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise InvalidArgument("the prompt is empty; send at least one token", param="prompt_ids")
        if request.max_new_tokens < 1:
            raise InvalidArgument(
                f"max_new_tokens must be at least 1, got {request.max_new_tokens}", param="max_new_tokens"
            )
        if not math.isfinite(request.temperature) or request.temperature < 0:
            raise InvalidArgument(
                f"temperature must be 0 (greedy) or more, got {request.temperature}", param="temperature"
            )
        if not 0 < request.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {request.top_p}", param="top_p")
        bad = [t for t in request.prompt_ids if not 0 <= t < self._vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt token ids {bad[:5]} are outside this model's vocabulary of {self._vocab_size}",
                param="prompt_ids",
            )
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_context_tokens is not None and total > self.max_context_tokens:
            raise InvalidArgument(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                f"is {total} tokens, more than the {self.max_context_tokens}-token context this model was "
                "loaded for; shorten the prompt or ask for fewer tokens",
                param="max_new_tokens",
            )

    @staticmethod
    def _finish_reason(job: Job, token: int, index: int, last_of_chunk: bool) -> FinishReason | None:
        if token in job.stop_ids:
            return "stop"
        if index + 1 >= job.request.max_new_tokens or last_of_chunk:
            return "length"
        return None

    async def _acquire_slot(self, job: Job) -> None:
        """Take a running slot, or wait in FIFO order for one handed over by a finishing sequence."""
        if self._running < self._max_running and not self._waiters:
            self._running += 1
            job.holds_slot = True
            return
        waiter: asyncio.Future[None] = job.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                job.holds_slot = True  # handed over just before the cancel: give it back in `finally`
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        job.holds_slot = True

    def _release_slot(self, job: Job) -> None:
        if not job.holds_slot:
            return
        job.holds_slot = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiter; _running is unchanged
                return
        self._running -= 1
