"""Continuous batching: transformers' paged KV cache and scheduler behind the async front, sized from the Plan.

:class:`ContinuousBatchingEngine` runs the library's continuous batching (its scheduler on the library's
own thread) with a cache sized from the Plan (:func:`continuous_batching_config`), never from the
library's default (60% of *total* RAM, zero-filled). The shared front (``runner/front.py``) does the
rest.

Private parts of transformers the engines use
---------------------------------------------
The library's continuous batching has no public API for what this engine needs, so it reaches into
``transformers.generation.continuous_batching`` (the version is capped below the next minor in
``pyproject.toml``, and ``tests/runner/test_transformers_private.py`` names what moved when one goes):

- ``ContinuousBatchingManager.logit_processor`` is swapped for :class:`~memserve.runner.sampling.SamplingProcessors`
  before ``start()``: the library decides greedy-or-sample once per manager, and per-request sampling needs our
  own processors. The generation thread reads the attribute when it builds its batch processor; the engine
  checks that ``batch_processor.logit_processor`` is ours and refuses to start if it is not.
- ``manager.output_router._lock`` and ``.result_handlers``: a cancelled request gets no last output, so its
  handler is unregistered by hand (the library has ``register_result_handler`` but no unregister).
- ``manager.batch_processor`` (None until the generation thread built it) with ``.cache.cache_tensor``,
  ``.cache.num_blocks``, ``.cache.max_batch_tokens`` and ``.inputs_and_outputs.attention_mask``: waited for at
  start, measured for the stats and written once by the worst-case warm-up, so the memory measured after is
  the peak; set back to None on stop to free the cache at once.
- ``manager.background_thread_status.fatal_error``: why the generation thread died (read with ``getattr``).
- ``model.config._attn_implementation``: ``init_continuous_batching`` may switch the attention implementation;
  it is restored on stop and on fallback (``make_engine``), and the warm-up reads it (eager attention costs
  more per chunk, ``runner/front.py``).
- ``ContinuousBatchingLogitsProcessor``/``ContinuousBatchingLogitsProcessorList`` from
  ``continuous_batching.cb_logits_processors`` (subclassed in ``runner/sampling.py``), with ``tensors_required``,
  ``supported_kwargs`` and the request state's ``logit_processor_kwargs``.
- ``manager.batch_processor.inputs_and_outputs.requests_in_batch`` (each ``FutureRequestState``'s
  ``state.request_id`` and ``query_length``, in the order their tokens are packed), read by a forward pre-hook
  on the model to give each token its request's LoRA adapter (``runner/lora.py``); the async IOs of a GPU keep
  it per IO pair (``io_pairs[current_pair].host_io``).
- ``GenerationConfig.prefill_chunk_size`` (undocumented; an unknown key would be kept and ignored silently):
  the ``generate`` fallback's chunked prefill, ``runner/fallback.py``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from memserve.errors import GenerationFailed, InvalidArgument
from memserve.memory.estimate import CONTINUOUS_BATCHING, KV_PAGE_TOKENS
from memserve.runner.front import (
    STOP_TIMEOUT_SECONDS,
    EngineBase,
    Job,
    check_positive,
    filler_prompt,
    worst_case_prompt_tokens,
)
from memserve.runner.lora import NO_ADAPTER, token_slots
from memserve.runner.sampling import SamplingProcessors
from memserve.runner.threads import on_fresh_thread
from memserve.wire.events import GenerationRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.continuous_batching import ContinuousBatchingManager
    from transformers.generation.continuous_batching.requests import GenerationOutput

__all__ = ["DEFAULT_PAGE_SIZE", "ContinuousBatchingEngine", "continuous_batching_config", "kv_cache_blocks"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = KV_PAGE_TOKENS
"""Tokens per KV page (64; the estimate prices the same pages). The library defaults to 256; every sequence
rounds up to whole pages, so smaller pages waste less of a cache sized exactly for the Plan."""

_POLL_SECONDS = 0.1
_WATCH_SECONDS = 0.5
_WARMUP_TIMEOUT_SECONDS = 600.0


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


# ----------------------------------------------------------------------------------------------------------
# The engine


class ContinuousBatchingEngine(EngineBase):
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

    name: str = CONTINUOUS_BATCHING

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
        check_positive(max_context_tokens=max_context_tokens, max_batch_tokens=max_batch_tokens)
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
        self._jobs: dict[str, Job] = {}
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
            on_fresh_thread(self._manager.start, name="memserve-cb-start")  # a daemon: see threads.py
            processor = self._wait_for_batch_processor()
            if processor.logit_processor is not sampling:
                raise RuntimeError("this transformers version did not take memserve's sampling processors")
            self._memory = self._measure_memory()
            if warmup:
                self._warm_up()
        except BaseException:
            self._stop_manager()
            raise
        self._adapter_hook = model.register_forward_pre_hook(self._route_adapters, with_kwargs=True)
        self._watcher = threading.Thread(target=self._watch, name="memserve-cb-watch", daemon=True)
        self._watcher.start()

    def _route_adapters(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook, on the generation thread: each packed token's LoRA slot, from its request's job.

        The library packs the step's requests in ``requests_in_batch`` order, ``query_length`` tokens each,
        then pads to the input's length; padding and requests of no job (warm-ups) are the base's."""
        if self.lora is None:
            return
        routing = self.lora.routing
        processor = self._manager.batch_processor
        io: Any = getattr(processor, "inputs_and_outputs", None)
        if hasattr(io, "io_pairs"):  # async batching (GPU): the pair being launched
            io = io.io_pairs[io.current_pair].host_io
        requests = getattr(io, "requests_in_batch", None)
        input_ids = kwargs.get("input_ids")
        if not requests or input_ids is None:
            routing.set(None)
            return
        with self._jobs_lock:
            jobs = [self._jobs.get(future.state.request_id) for future in requests]
        slots = [job.slot if job is not None else NO_ADAPTER for job in jobs]
        counts = [int(future.query_length) for future in requests]
        routing.set(token_slots(counts, slots, int(input_ids.shape[-1]), device=input_ids.device))

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
        (:func:`worst_case_prompt_tokens`; one token generated): its logits, MLP and attention
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
                for mask in masks.values() if isinstance(masks, dict) else ():
                    mask.zero_()
                    touched += int(mask.nbytes)
        assert self.max_context_tokens is not None
        tokens = worst_case_prompt_tokens(self.model, self.max_context_tokens, self.cb_config.max_batch_tokens)
        prompt = filler_prompt(tokens, self._vocab_size, self._default_stop_ids)
        self._warm_up(prompt, request_id="memserve-worst-case")
        return {
            "prompt_tokens": len(prompt),
            "measured_sequences": 1,
            "touched_bytes": touched,
            "seconds": round(time.perf_counter() - started, 3),
        }

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

    def _submit(self, job: Job) -> None:
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

    def _cancel(self, job: Job) -> None:
        self._forget(job)
        router = self._manager.output_router  # a cancelled request gets no last output to unregister it
        with router._lock:
            router.result_handlers.pop(job.key, None)
        self._manager.cancel_request(job.key)

    def _forget(self, job: Job) -> None:
        with self._jobs_lock:
            self._jobs.pop(job.key, None)

    def _jobs_in_flight(self) -> list[Job]:
        with self._jobs_lock:
            return list(self._jobs.values())

    def _extra_stats(self) -> dict[str, Any]:
        figures: dict[str, Any] = dict(self._memory)
        used = self._kv_cache_blocks_used()
        if used is not None:
            figures["kv_cache_blocks_used"] = used
        return figures

    def _kv_cache_blocks_used(self) -> int | None:
        """KV pages in use now, in whole-model pages: the library's own free fraction of its paged cache
        (``PagedAttentionCache.compute_free_capacity``: free sectors plus the free pages of each allocator; a
        private part, checked in tests) applied to ``kv_cache_blocks``. None before the cache exists."""
        processor = self._manager.batch_processor
        blocks = self._memory.get("kv_cache_blocks")
        if processor is None or not blocks:
            return None
        free = float(processor.cache.compute_free_capacity(relative=True))
        return max(0, min(int(blocks), round(int(blocks) * (1.0 - free))))

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

    def _on_output(self, job: Job, output: GenerationOutput) -> None:
        """On the loop: turn the library's cumulative output into a chunk of new tokens."""
        tokens = list(output.generated_tokens[job.received :])
        job.received += len(tokens)
        self._deliver(job, tokens, output.is_finished(), output.error)

    def _thread_error(self) -> str:
        status = getattr(self._manager, "background_thread_status", None)
        error = getattr(status, "fatal_error", None)
        return f"{type(error).__name__}: {error}" if error is not None else "no error recorded"

    def _stop_manager(self) -> None:
        hook = getattr(self, "_adapter_hook", None)
        if hook is not None:
            hook.remove()  # the model outlives this engine (a rebuild, the fallback)
        manager = self._manager
        if manager.is_running():
            manager.stop(block=True, timeout=STOP_TIMEOUT_SECONDS, hard_stop=True)
        manager.destroy()
        manager.batch_processor = None  # frees the cache now; stop() skips this when the manager never started
        self._restore_attention()  # ... and this

    def _restore_attention(self) -> None:
        if self.model.config._attn_implementation != self._original_attn:
            self.model.set_attn_implementation(self._original_attn)

    def _shutdown(self) -> None:
        self._stopping.set()
        self._stop_manager()
        self._watcher.join(timeout=STOP_TIMEOUT_SECONDS)
