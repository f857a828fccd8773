"""Generation engines: one loaded ``transformers`` model behind the async :class:`Engine` protocol.

- :class:`ContinuousBatchingEngine` wraps transformers' continuous batching (a paged KV cache and a
  scheduler on the library's own thread). Its cache is sized from the Plan, never from the library's
  default (60% of *total* RAM, zero-filled).
- :class:`GenerateEngine` is the fallback for models continuous batching cannot serve: one worker
  thread running plain ``model.generate``, the requests waiting at each call batched together
  (static batching, left-padded).
- :func:`make_engine` tries the first and falls back to the second, saying why.

Both engines share the async front (:class:`_EngineBase`): validation, the bound on running and
waiting sequences (``QueueFull``), streaming token events, cancellation when the consumer goes away,
and the stats. One event loop should drive an engine at a time.

Sampling semantics are OpenAI's: ``temperature == 0`` is greedy, otherwise temperature and top_p with
no top_k. Other processors from the model's ``generation_config.json`` (a repetition penalty, say)
apply in both engines, as they would in ``model.generate``. An empty ``stop_token_ids`` means the
generation config's eos ids; negative ids are dropped, so ``(-1,)`` asks for no stop token at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from memserve.errors import GenerationFailed, InvalidArgument
from memserve.memory.estimate import KV_PAGE_TOKENS
from memserve.runner.events import Engine, EngineStats, FinishReason, GenerationRequest, QueueFull, TokenEvent
from memserve.runner.sampling import SamplingProcessors

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager
    from transformers.generation.continuous_batching.requests import GenerationOutput

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "ContinuousBatchingEngine",
    "GenerateEngine",
    "GenerationFailed",
    "continuous_batching_config",
    "kv_cache_blocks",
    "make_engine",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = KV_PAGE_TOKENS
"""Tokens per KV page (64; the estimate prices the same pages). The library defaults to 256; every sequence
rounds up to whole pages, so smaller pages waste less of a cache sized exactly for the Plan."""

_POLL_SECONDS = 0.1
_WATCH_SECONDS = 0.5
_WARMUP_REQUEST = GenerationRequest(request_id="memserve-warmup", prompt_ids=(0,), max_new_tokens=1)
_WARMUP_TIMEOUT_SECONDS = 600.0
_STOP_TIMEOUT_SECONDS = 30.0


# ----------------------------------------------------------------------------------------------------------
# Sizing (pure)


def kv_cache_blocks(*, max_sequences: int, max_context_tokens: int, page_size: int) -> int:
    """Pages the cache needs so ``max_sequences`` sequences of ``max_context_tokens`` always fit.

    Pages are never shared between sequences, so each one rounds up on its own; one more page per
    sequence is slack for layer groups carved from shared sectors (a sliding-window group can hold a
    page beyond its window).
    """
    return max_sequences * (math.ceil(max_context_tokens / page_size) + 1)


def continuous_batching_config(
    *,
    max_sequences: int,
    max_context_tokens: int,
    max_batch_tokens: int,
    page_size: int = DEFAULT_PAGE_SIZE,
    accelerator: bool = False,
) -> ContinuousBatchingConfig:
    """The library config for a Plan: every size explicit, nothing inferred from free memory.

    - ``num_blocks`` from :func:`kv_cache_blocks`, ``max_batch_tokens`` as planned, and at most
      ``max_sequences`` requests per forward (the engine never hands the library more than that).
    - ``max_memory_percent=1.0``: the library only checks that the explicit footprint fits; whether it
      is *wise* is the planner's call, and its CPU default (60% of total RAM) would refuse big plans.
    - ``safety_margin=0`` and no prefix sharing: with an exactly-sized cache a margin would hold back
      admitted sequences, and prefix-cached pages are only evicted under that margin.
    - The manager decodes greedily; sampling is done by the engine's own per-request processors (see
      :class:`ContinuousBatchingEngine`), so the library's per-request warpers stay off.
    - On an accelerator the block-table decode path is sized to a whole sequence; on CPU it does not
      exist, and asking for it only logs a warning.
    """
    blocks_per_sequence = math.ceil(max_context_tokens / page_size) + 1
    return ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=kv_cache_blocks(
            max_sequences=max_sequences, max_context_tokens=max_context_tokens, page_size=page_size
        ),
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_sequences,
        max_memory_percent=1.0,
        max_blocks_per_request=blocks_per_sequence + blocks_per_sequence % 2 if accelerator else None,
        allow_block_sharing=False,
        safety_margin=0.0,
        per_request_processors=False,
        cpu_offload_space=0.0,
        max_queue_size=0,
    )


def _filler_prompt(tokens: int, vocab_size: int, avoid: tuple[int, ...]) -> list[int]:
    """``tokens`` ordinary token ids (no stop token), for a warm-up that fills a context."""
    ids = [t for t in range(min(vocab_size, 4096)) if t not in avoid][3:] or [0]
    return [ids[i % len(ids)] for i in range(max(1, tokens))]


def _worst_case_prompt_tokens(model: Any, context_tokens: int, max_batch_tokens: int | None) -> int:
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {value}", param=name)


def _eos_ids(config: GenerationConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    if isinstance(eos, int):
        return (eos,) if eos >= 0 else ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(t) for t in eos if int(t) >= 0)
    return ()


# ----------------------------------------------------------------------------------------------------------
# The async front shared by both engines


@dataclass(frozen=True)
class _Chunk:
    """What a generation thread hands the event loop: new tokens, and whether (or how) it ended."""

    tokens: list[int]
    finished: bool = False
    error: str | None = None


@dataclass(eq=False)
class _Job:
    """One accepted request, as the event loop and the generation thread both see it."""

    request: GenerationRequest
    key: str  # unique inside the engine: callers may reuse request ids
    loop: asyncio.AbstractEventLoop
    stop_ids: frozenset[int]
    accepted_at: float
    chunks: asyncio.Queue[_Chunk] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    holds_slot: bool = False
    done: bool = False  # the engine delivered its last chunk
    received: int = 0  # tokens already taken from the library's cumulative outputs


class _EngineBase:
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
        _check_positive(max_sequences=max_sequences)
        if max_queue < 0:
            raise InvalidArgument(f"max_queue must be 0 or more, got {max_queue}", param="max_queue")
        self.model = model
        self.max_sequences = max_sequences
        self.max_queue = max_queue
        self.max_context_tokens = max_context_tokens
        self._max_running = max_running
        base = generation_config if generation_config is not None else model.generation_config
        self._base_config = copy.deepcopy(base) if base is not None else GenerationConfig()
        self._default_stop_ids = _eos_ids(self._base_config)
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

        Raises InvalidArgument or QueueFull before yielding anything. Leaving early (``aclose``, a
        cancelled task) cancels the sequence at once and frees its slot and cache pages.
        """
        self._validate(request)
        if self._closed:
            raise GenerationFailed("the engine is closed", code="engine_closed")
        if self._failure is not None:
            raise GenerationFailed(self._failure, code="engine_failed")
        if self._running + len(self._waiters) >= self.max_sequences + self.max_queue:
            self._rejected_total += 1
            raise QueueFull(self._running, len(self._waiters))
        job = _Job(
            request=request,
            key=f"{request.request_id}#{next(self._keys)}",
            loop=asyncio.get_running_loop(),
            stop_ids=frozenset(t for t in request.stop_token_ids or self._default_stop_ids if t >= 0),
            accepted_at=time.perf_counter(),
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

    def _submit(self, job: _Job) -> None:
        raise NotImplementedError

    def _cancel(self, job: _Job) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Stop the generation thread (runs in a worker thread: it may block)."""
        raise NotImplementedError

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def _jobs_in_flight(self) -> list[_Job]:
        raise NotImplementedError

    def _forget(self, job: _Job) -> None:
        """Drop the job from the routing table of the generation thread, if the engine has one."""

    def _deliver(self, job: _Job, tokens: list[int], finished: bool = False, error: str | None = None) -> None:
        """On the loop: hand a chunk to the job's consumer; free the slot as soon as the sequence ends."""
        if job.done:
            return
        self._generation_tokens_total += len(tokens)
        if finished or error is not None:
            job.done = True
            self._forget(job)
            self._release_slot(job)
        job.chunks.put_nowait(_Chunk(tokens, finished or error is not None, error))

    def _post(self, job: _Job, callback: Callable[..., None], *args: Any) -> None:
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
    def _finish_reason(job: _Job, token: int, index: int, last_of_chunk: bool) -> FinishReason | None:
        if token in job.stop_ids:
            return "stop"
        if index + 1 >= job.request.max_new_tokens or last_of_chunk:
            return "length"
        return None

    async def _acquire_slot(self, job: _Job) -> None:
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

    def _release_slot(self, job: _Job) -> None:
        if not job.holds_slot:
            return
        job.holds_slot = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiter; _running is unchanged
                return
        self._running -= 1


# ----------------------------------------------------------------------------------------------------------
# Continuous batching


def _start_as_daemon(start: Callable[[], None]) -> None:
    """Call ``start`` from a daemon thread: threads inherit daemon-ness from the thread that creates
    them, and the library's generation thread (non-daemon by default) would otherwise hold the process
    open at exit until someone stops it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start()
        except BaseException as exc:  # handed back to the caller below
            errors.append(exc)

    starter = threading.Thread(target=run, name="memserve-cb-start", daemon=True)
    starter.start()
    starter.join()
    if errors:
        raise errors[0]


class ContinuousBatchingEngine(_EngineBase):
    """transformers' continuous batching with a Plan-sized paged cache.

    - The library runs its loop on its own thread (started as a daemon, so a server that exits
      without awaiting :meth:`close` still exits) and posts each step's outputs to the event loop
      through the handlers the engine registers per request (the library batches a step's outputs
      into one callback for one loop: drive an engine from one loop at a time). A daemon watcher
      fails what is in flight if that thread stops. Await :meth:`close` to stop cleanly.
    - At most ``max_sequences`` requests are inside the library at once (so the cache, sized for that
      many full contexts, never runs out); up to ``max_queue`` more wait here, in FIFO order.
    - The library decides greedy-or-sample once per manager, so the manager decodes by argmax and
      the engine's own per-request processors (``memserve.runner.sampling``) turn sampled rows into
      Gumbel-max draws; greedy rows stay untouched, so they are ``generate``'s argmax exactly (ties
      included).
    - Per-request seeds are not supported (the noise comes from torch's global generator, shared by
      the batch): ``seed`` is ignored.
    """

    name = "continuous-batching"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_sequences: int,
        max_queue: int,
        max_context_tokens: int,
        max_batch_tokens: int,
        page_size: int = DEFAULT_PAGE_SIZE,
        generation_config: GenerationConfig | None = None,
        warmup: bool = True,
    ) -> None:
        _check_positive(max_context_tokens=max_context_tokens, max_batch_tokens=max_batch_tokens)
        if page_size < 4:
            raise InvalidArgument(f"page_size must be at least 4 tokens, got {page_size}", param="page_size")
        super().__init__(
            model,
            max_running=max_sequences,
            max_sequences=max_sequences,
            max_queue=max_queue,
            max_context_tokens=max_context_tokens,
            generation_config=generation_config,
        )
        self.cb_config = continuous_batching_config(
            max_sequences=max_sequences,
            max_context_tokens=max_context_tokens,
            max_batch_tokens=max_batch_tokens,
            page_size=page_size,
            accelerator=model.device.type != "cpu",
        )
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._memory: dict[str, int] = {}

        self._original_attn = model.config._attn_implementation
        try:
            # may switch the model's attention implementation (to flash, where installed)
            self._manager: ContinuousBatchingManager = cast(Any, model).init_continuous_batching(
                generation_config=self._manager_config(), continuous_batching_config=self.cb_config
            )
        except BaseException:
            self._restore_attention()
            raise
        try:
            sampling = SamplingProcessors(self._manager.logit_processor.logits_processor)
            self._manager.logit_processor = sampling  # read when the generation thread builds its batch processor
            # The generation thread builds its batch processor (paged cache, static inputs) itself. Calling the
            # library's warmup() from this thread before start() builds it here instead, and then every step
            # runs ~30% slower on CPU (small demo model, transformers 5.23: 50 → 38 tok/s); a model the cache
            # cannot serve now fails on that thread, and _wait_for_batch_processor reports its error.
            _start_as_daemon(self._manager.start)
            processor = self._wait_for_batch_processor()
            if processor.logit_processor is not sampling:
                raise RuntimeError("this transformers version did not take memserve's sampling processors")
            self._memory = self._measure_memory()
            if warmup:
                self._warm_up()
        except BaseException:
            self._stop_manager()
            raise
        self._watcher = threading.Thread(target=self._watch, name="memserve-cb-watch", daemon=True)
        self._watcher.start()

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the paged KV tensor the library allocated (pages plus its two trash sectors)."""
        return self._memory.get("kv_cache_bytes", 0)

    def _manager_config(self) -> GenerationConfig:
        """The manager's config: argmax decoding (sampling is ours), the model's other processors kept."""
        config = copy.deepcopy(self._base_config)
        config.do_sample = False
        config.temperature = config.top_k = config.top_p = None
        config.num_return_sequences = 1
        if config.eos_token_id is None:
            config.eos_token_id = -1
        return config

    @staticmethod
    def _request_kwargs(request: GenerationRequest) -> dict[str, Any]:
        if request.temperature == 0:
            return {"temperature": 0.0, "top_p": 0.0}
        return {"temperature": float(request.temperature), "top_p": float(request.top_p)}

    def _measure_memory(self) -> dict[str, int]:
        processor = self._manager.batch_processor
        if processor is None:
            return {}
        cache = processor.cache
        memory = {
            "kv_cache_bytes": int(cache.cache_tensor.nbytes),
            "kv_cache_blocks": int(cache.num_blocks),
            "page_size": int(self.cb_config.page_size),
            "max_batch_tokens": int(cache.max_batch_tokens),
        }
        masks = getattr(processor.inputs_and_outputs, "attention_mask", None)
        if isinstance(masks, dict):  # eager/sdpa preallocate [1, 1, M, cache tokens + M] per layer type
            memory["attention_mask_bytes"] = sum(int(m.nbytes) for m in masks.values())
        return memory

    def _wait_for_batch_processor(self) -> Any:
        """The batch processor once the generation thread has built it; GenerationFailed if the thread dies first."""
        deadline = time.monotonic() + _WARMUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            processor = self._manager.batch_processor
            if processor is not None:
                return processor
            if not self._manager.is_running():
                raise GenerationFailed(f"continuous batching could not build its cache: {self._thread_error()}")
            time.sleep(0.005)
        raise GenerationFailed(f"continuous batching took more than {_WARMUP_TIMEOUT_SECONDS:.0f} s to build its cache")

    def warm_up_worst_case(self) -> dict[str, Any]:
        """The heaviest work this engine admits, before any traffic, so the memory measured after is its peak.

        Every page of the KV cache and of the preallocated attention masks is written (full traffic
        writes them all; until then they are untouched zero pages that cost nothing), then one request
        runs through the manager as any request does, with the largest prefill chunk the plan admits
        (:func:`_worst_case_prompt_tokens`; one token generated): its logits, MLP and attention
        transients are those of the largest forward a request can cause.
        """
        started = time.perf_counter()
        processor = self._manager.batch_processor
        touched = 0
        if processor is not None:
            with torch.inference_mode():
                cache_tensor = processor.cache.cache_tensor
                cache_tensor.zero_()
                touched += int(cache_tensor.nbytes)
                masks = getattr(processor.inputs_and_outputs, "attention_mask", None)
                for mask in (masks.values() if isinstance(masks, dict) else ()):
                    mask.zero_()
                    touched += int(mask.nbytes)
        assert self.max_context_tokens is not None
        tokens = _worst_case_prompt_tokens(self.model, self.max_context_tokens, self.cb_config.max_batch_tokens)
        prompt = _filler_prompt(tokens, self._vocab_size, self._default_stop_ids)
        self._warm_up(prompt, request_id="memserve-worst-case")
        return {"prompt_tokens": len(prompt), "measured_sequences": 1, "touched_bytes": touched,
                "seconds": round(time.perf_counter() - started, 3)}

    def _warm_up(self, prompt: list[int] | None = None, request_id: str = "memserve-warmup") -> None:
        """One real request through the manager: proves the model runs under paged attention."""
        token = self._default_stop_ids[0] if self._default_stop_ids else 0
        added = self._manager.add_request(
            prompt or [token], request_id=request_id, max_new_tokens=1, eos_token_id=-1, temperature=0.0, top_p=0.0
        )
        if added is None:
            raise GenerationFailed("the continuous batching manager refused the warm-up request")
        request_id = added
        deadline = time.monotonic() + _WARMUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            output = self._manager.get_result(request_id=request_id, timeout=_POLL_SECONDS)
            if output is not None and output.is_finished():
                if output.error is not None:
                    raise GenerationFailed(f"continuous batching warm-up failed: {output.error}")
                return
            if output is None and not self._manager.is_running():
                raise GenerationFailed(f"continuous batching thread died during warm-up: {self._thread_error()}")
        raise GenerationFailed(f"continuous batching warm-up took more than {_WARMUP_TIMEOUT_SECONDS:.0f} s")

    def _submit(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs[job.key] = job
        # The generation thread hands each step's outputs to this loop itself (one call_soon_threadsafe
        # per step for all of them), as transformers serve does: no thread in between.
        self._manager.register_result_handler(job.key, functools.partial(self._on_output, job))
        request = job.request
        added = self._manager.add_request(
            list(request.prompt_ids),
            request_id=job.key,
            max_new_tokens=request.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(job.stop_ids),
            **self._request_kwargs(request),
        )
        if added is None:
            self._deliver(job, [], True, f"the continuous batching thread is not running: {self._thread_error()}")

    def _cancel(self, job: _Job) -> None:
        self._forget(job)
        router = self._manager.output_router  # a cancelled request gets no last output to unregister it
        with router._lock:
            router.result_handlers.pop(job.key, None)
        self._manager.cancel_request(job.key)

    def _forget(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.pop(job.key, None)

    def _jobs_in_flight(self) -> list[_Job]:
        with self._jobs_lock:
            return list(self._jobs.values())

    def _extra_stats(self) -> dict[str, Any]:
        return dict(self._memory)

    def _watch(self) -> None:
        """Watcher thread: if the library's generation thread stops on its own, fail what is in flight."""
        manager = self._manager
        while not self._stopping.wait(_WATCH_SECONDS):
            if not manager.is_running():
                if self._stopping.is_set():
                    return
                self._failure = f"the continuous batching thread stopped: {self._thread_error()}"
                log.error(self._failure)
                self._fail_all(self._failure)
                return

    def _on_output(self, job: _Job, output: GenerationOutput) -> None:
        """On the loop: turn the library's cumulative output into a chunk of new tokens."""
        tokens = list(output.generated_tokens[job.received :])
        job.received += len(tokens)
        self._deliver(job, tokens, output.is_finished(), output.error)

    def _thread_error(self) -> str:
        status = getattr(self._manager, "background_thread_status", None)
        error = getattr(status, "fatal_error", None)
        return f"{type(error).__name__}: {error}" if error is not None else "no error recorded"

    def _stop_manager(self) -> None:
        manager = self._manager
        if manager.is_running():
            manager.stop(block=True, timeout=_STOP_TIMEOUT_SECONDS, hard_stop=True)
        manager.destroy()
        manager.batch_processor = None  # frees the cache now; stop() skips this when the manager never started
        self._restore_attention()  # ... and this

    def _restore_attention(self) -> None:
        if self.model.config._attn_implementation != self._original_attn:
            self.model.set_attn_implementation(self._original_attn)

    def _shutdown(self) -> None:
        self._stopping.set()
        self._stop_manager()
        self._watcher.join(timeout=_STOP_TIMEOUT_SECONDS)


# ----------------------------------------------------------------------------------------------------------
# Plain generate


class _Rows:
    """The rows of one batched ``generate`` call: each row's tokens go to its job, until the row ends.

    ``generate`` calls the streamer with each step's tokens (one per row) before it asks its stopping
    criteria, so :meth:`put` decides which rows are done (their stop token, their own
    ``max_new_tokens``, or their consumer gone) and :meth:`stopped` hands that to ``generate``. A row
    that ended keeps being computed until the whole batch has, but its tokens go nowhere.
    """

    def __init__(self, jobs: list[_Job], post: Callable[[_Job, list[int]], None]) -> None:
        self.jobs = jobs
        self.post = post
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)

    def put(self, tokens: list[int]) -> None:
        for row, (job, token) in enumerate(zip(self.jobs, tokens, strict=True)):
            if self.done[row] or job.cancelled.is_set():
                self.done[row] = True
                continue
            self.counts[row] += 1
            self.post(job, [token])
            if token in job.stop_ids or self.counts[row] >= job.request.max_new_tokens:
                self.done[row] = True

    def stopped(self) -> list[bool]:
        return [done or job.cancelled.is_set() for done, job in zip(self.done, self.jobs, strict=True)]


class _RowsCriteria(StoppingCriteria):
    """``generate``'s per-row stop: the rows :class:`_Rows` has ended."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor(self.rows.stopped(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RowsStreamer(BaseStreamer):
    """Receives token ids from ``generate``: the prompts first (ignored), then one token per row per step."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.rows.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        """The worker reports each row's end itself, after ``generate`` returns."""


class GenerateEngine(_EngineBase):
    """The fallback: plain ``model.generate`` on a worker thread, requests batched statically.

    Up to ``max_sequences`` requests run at once and ``max_queue`` more wait. The worker takes every
    request waiting when it starts a call and runs them as one left-padded batch: those that decode
    the same way (greedy, or the same temperature and top_p) go together, up to ``max_sequences``;
    a request that arrives meanwhile waits for the next call (static batching, unlike continuous
    batching). Each row stops on its own stop tokens and its own ``max_new_tokens``; the call ends
    when every row has. A request with a ``seed`` that samples runs alone, after seeding torch's
    global generator, so that the seed alone decides its draws.
    """

    name = "generate"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_sequences: int,
        max_queue: int,
        max_context_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
        warmup: bool = True,
    ) -> None:
        if max_batch_tokens is not None:
            _check_positive(max_batch_tokens=max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        super().__init__(
            model,
            max_running=max_sequences,
            max_sequences=max_sequences,
            max_queue=max_queue,
            max_context_tokens=max_context_tokens,
            generation_config=generation_config,
        )
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._pending: deque[_Job] = deque()  # the worker's: taken from the inbox, not yet in a batch
        self._current: list[_Job] = []
        self._calls_total = 0
        self._largest_batch = 0
        self._pad_id = self._base_config.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._default_stop_ids[0] if self._default_stop_ids else 0
        if warmup:  # one forward faults the mapped weights in, so memory measured after is true
            cast(Any, model).generate(
                input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device),
                attention_mask=torch.ones((1, 1), dtype=torch.long, device=model.device),
                generation_config=self._config_for(_WARMUP_REQUEST, 1),
            )
        self._worker = threading.Thread(target=self._work, name="memserve-generate", daemon=True)
        self._worker.start()

    def _submit(self, job: _Job) -> None:
        self._inbox.put(job)

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()

    def _jobs_in_flight(self) -> list[_Job]:
        return [job for job in [*self._current, *self._pending] if not job.done]

    def _extra_stats(self) -> dict[str, Any]:
        return {"generate_calls_total": self._calls_total, "largest_batch": self._largest_batch}

    def _shutdown(self) -> None:
        for job in list(self._current):
            job.cancelled.set()
        self._inbox.put(None)
        self._worker.join(timeout=_STOP_TIMEOUT_SECONDS)

    @staticmethod
    def _decoding(request: GenerationRequest) -> tuple[float, float] | None:
        """Requests with the same key can share a ``generate`` call; None: this one runs alone (it samples
        with a seed, which seeds torch's global generator for the whole call)."""
        if request.temperature == 0:
            return (0.0, 0.0)
        return None if request.seed is not None else (float(request.temperature), float(request.top_p))

    def prefill_chunk_tokens(self, rows: int, prompt_tokens: int) -> int | None:
        """Tokens per row in one prefill forward, so that a forward never holds more than ``max_batch_tokens``
        tokens (the plan's bound on activations); None when the prompt fits in one forward."""
        if self.max_batch_tokens is None:
            return None
        chunk = max(1, self.max_batch_tokens // max(1, rows))
        return chunk if chunk < prompt_tokens else None

    def warm_up_worst_case(self) -> dict[str, Any]:
        """One sequence with the largest prompt chunk (:func:`_worst_case_prompt_tokens`; one token
        generated), through ``generate`` with the same chunked prefill requests get. Rows beyond the first
        are not run (each would cost a whole prefill); their KV cache is the caller's to add, as
        ``measured_sequences`` says how many were measured."""
        started = time.perf_counter()
        tokens = _worst_case_prompt_tokens(self.model, self.max_context_tokens or 2, self.max_batch_tokens)
        prompt = _filler_prompt(tokens, self._vocab_size, self._default_stop_ids)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
        config = self._config_for(_WARMUP_REQUEST, 1, rows=1, prompt_tokens=len(prompt))
        with torch.inference_mode():
            cast(Any, self.model).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           generation_config=config)
        return {"prompt_tokens": len(prompt), "measured_sequences": 1, "touched_bytes": 0,
                "seconds": round(time.perf_counter() - started, 3)}

    def _config_for(self, request: GenerationRequest, max_new_tokens: int, *, rows: int = 1,
                    prompt_tokens: int = 1) -> GenerationConfig:
        config = copy.deepcopy(self._base_config)
        config.prefill_chunk_size = self.prefill_chunk_tokens(rows, prompt_tokens)
        config.max_new_tokens = max_new_tokens
        config.num_return_sequences = 1
        config.eos_token_id = []  # each row's stop tokens are checked by _Rows; [] keeps the model's eos off
        config.pad_token_id = self._pad_id
        if request.temperature == 0:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = float(request.temperature)
            config.top_p = float(request.top_p)
            config.top_k = 0  # OpenAI semantics: no top-k (generate would default to 50)
        return config

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting job and the waiting jobs that decode like it, up to ``max_sequences``."""
        first = self._pending.popleft()
        key = self._decoding(first.request)
        if key is None:
            return [first]
        batch, rest = [first], deque[_Job]()
        for job in self._pending:
            if len(batch) < self.max_sequences and self._decoding(job.request) == key:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest  # the others keep their order, ahead of anything that arrives later
        return batch

    def _work(self) -> None:
        """Worker thread: batch the waiting jobs, run each batch's ``generate``, post tokens to the loops."""
        while True:
            if not self._pending:
                job = self._inbox.get()
                if job is None:
                    return
                self._pending.append(job)
            while True:  # everything that arrived meanwhile
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return  # close() fails what is still pending
                self._pending.append(job)
            batch = [job for job in self._take_batch() if not job.cancelled.is_set()]
            if not batch:
                continue
            self._current = batch
            self._calls_total += 1
            self._largest_batch = max(self._largest_batch, len(batch))
            error: str | None = None
            try:
                self._run(batch)
            except Exception as exc:  # reported to the jobs' consumers, never swallowed
                log.exception("generate failed for %s", ", ".join(j.request.request_id for j in batch))
                error = f"{type(exc).__name__}: {exc}"
            for job in batch:
                job_error = error
                if job_error is None and job.cancelled.is_set():  # stopped early: it must not read as finished
                    job_error = "the engine was closed" if self._closed else "the sequence was cancelled"
                self._post(job, self._deliver, job, [], True, job_error)
            self._current = []

    @torch.no_grad()
    def _run(self, batch: list[_Job]) -> None:
        first = batch[0].request
        if first.seed is not None and first.temperature > 0:
            torch.manual_seed(first.seed)
        device = self.model.device
        width = max(len(job.request.prompt_ids) for job in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, job in enumerate(batch):  # left padding: every row's last prompt token lines up
            prompt = job.request.prompt_ids
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[row, width - len(prompt):] = 1
        rows = _Rows(batch, lambda job, tokens: self._post(job, self._deliver, job, tokens))
        cast(Any, self.model).generate(  # PreTrainedModel's stubs leave out GenerationMixin
            input_ids=ids,
            attention_mask=mask,
            generation_config=self._config_for(first, max(job.request.max_new_tokens for job in batch),
                                               rows=len(batch), prompt_tokens=width),
            streamer=_RowsStreamer(rows),
            stopping_criteria=StoppingCriteriaList([_RowsCriteria(rows)]),
        )


# ----------------------------------------------------------------------------------------------------------


def make_engine(
    model: PreTrainedModel,
    *,
    prefer: str = "continuous-batching",
    max_sequences: int,
    max_queue: int,
    max_context_tokens: int,
    max_batch_tokens: int,
    page_size: int = DEFAULT_PAGE_SIZE,
    generation_config: GenerationConfig | None = None,
    warmup: bool = True,
) -> tuple[Engine, str | None]:
    """The engine to serve ``model`` with, and why it is not the preferred one (None when it is).

    Continuous batching is tried first unless ``prefer="generate"``; any error while building it
    (an attention implementation or layer type it cannot page, a failed warm-up) falls back to
    :class:`GenerateEngine` with the error as the reason. Bad sizes are the caller's error and raise.
    """
    if prefer not in ("continuous-batching", "generate"):
        raise InvalidArgument(
            f"unknown engine {prefer!r}; choose 'continuous-batching' or 'generate'", param="prefer"
        )
    reason: str | None = None
    if prefer == "continuous-batching":
        original_attn = model.config._attn_implementation
        try:
            engine = ContinuousBatchingEngine(
                model,
                max_sequences=max_sequences,
                max_queue=max_queue,
                max_context_tokens=max_context_tokens,
                max_batch_tokens=max_batch_tokens,
                page_size=page_size,
                generation_config=generation_config,
                warmup=warmup,
            )
            return engine, None
        except InvalidArgument:
            raise
        except Exception as exc:  # any library failure means "this model cannot be paged": fall back
            log.warning("continuous batching unavailable, falling back to generate: %s", exc)
            reason = f"continuous batching could not start for this model ({type(exc).__name__}: {exc})"
            if model.config._attn_implementation != original_attn:
                model.set_attn_implementation(original_attn)
    fallback = GenerateEngine(
        model,
        max_sequences=max_sequences,
        max_queue=max_queue,
        max_context_tokens=max_context_tokens,
        max_batch_tokens=max_batch_tokens,
        generation_config=generation_config,
        warmup=warmup,
    )
    return fallback, reason
