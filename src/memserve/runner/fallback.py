"""The fallback engine: plain ``model.generate`` on one worker thread, requests batched statically.

:class:`GenerateEngine` serves the models transformers' continuous batching cannot page (``make_engine``
falls back to it, saying why) and those whose plan names it (a model's ``engine: generate``, ``memserve fit
--engine generate``; ``MEMSERVE_ENGINE=generate`` overrides a plan). Its worker thread owns
the model; the shared front (``runner/front.py``) does the rest.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from memserve.memory.estimate import GENERATE
from memserve.runner.front import (
    STOP_TIMEOUT_SECONDS,
    WARMUP_REQUEST,
    EngineBase,
    Job,
    check_positive,
    filler_prompt,
    worst_case_prompt_tokens,
)
from memserve.wire.events import GenerationRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["GenerateEngine"]

log = logging.getLogger(__name__)


class _Rows:
    """The rows of one batched ``generate`` call: each row's tokens go to its job, until the row ends.

    ``generate`` calls the streamer with each step's tokens (one per row) before it asks its stopping
    criteria, so :meth:`put` decides which rows are done (their stop token, their own
    ``max_new_tokens``, or their consumer gone) and :meth:`stopped` hands that to ``generate``. A row
    that ended keeps being computed until the whole batch has, but its tokens go nowhere.
    """

    def __init__(self, jobs: list[Job], post: Callable[[Job, list[int]], None]) -> None:
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


class GenerateEngine(EngineBase):
    """The fallback: plain ``model.generate`` on a worker thread, requests batched statically.

    Up to ``max_sequences`` requests run at once and ``max_queue`` more wait. The worker takes every
    request waiting when it starts a call and runs them as one left-padded batch: those that decode
    the same way (greedy, or the same temperature and top_p) go together, up to ``max_sequences``;
    a request that arrives meanwhile waits for the next call (static batching, unlike continuous
    batching). Each row stops on its own stop tokens and its own ``max_new_tokens``; the call ends
    when every row has. A request with a ``seed`` that samples runs alone, after seeding torch's
    global generator, so that the seed alone decides its draws. Rows of different LoRA adapters share a
    call: each row's adapter slot is set in the bank's routing for the call (``runner/lora.py``), one code
    path with continuous batching, rather than PEFT's ``adapter_names``, which would need a PeftModel
    around the base and a second way to load adapters.
    """

    name: str = GENERATE

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
            check_positive(max_batch_tokens=max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        super().__init__(
            model,
            max_running=max_sequences,
            max_sequences=max_sequences,
            max_queue=max_queue,
            max_context_tokens=max_context_tokens,
            generation_config=generation_config,
        )
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._pending: deque[Job] = deque()  # the worker's: taken from the inbox, not yet in a batch
        self._current: list[Job] = []
        self._calls_total = 0
        self._largest_batch = 0
        self._pad_id = self._base_config.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._default_stop_ids[0] if self._default_stop_ids else 0
        if warmup:  # one forward faults the mapped weights in, so memory measured after is true
            cast(Any, model).generate(
                input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device),
                attention_mask=torch.ones((1, 1), dtype=torch.long, device=model.device),
                generation_config=self._config_for(WARMUP_REQUEST, 1),
            )
        self._worker = threading.Thread(target=self._work, name="memserve-generate", daemon=True)
        self._worker.start()

    def _submit(self, job: Job) -> None:
        self._inbox.put(job)

    def _cancel(self, job: Job) -> None:
        job.cancelled.set()

    def _jobs_in_flight(self) -> list[Job]:
        return [job for job in [*self._current, *self._pending] if not job.done]

    def _extra_stats(self) -> dict[str, Any]:
        return {"generate_calls_total": self._calls_total, "largest_batch": self._largest_batch}

    def _shutdown(self) -> None:
        for job in list(self._current):
            job.cancelled.set()
        self._inbox.put(None)
        self._worker.join(timeout=STOP_TIMEOUT_SECONDS)

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
        """One sequence with the largest prompt chunk (:func:`worst_case_prompt_tokens`; one token
        generated), through ``generate`` with the same chunked prefill requests get. Rows beyond the first
        are not run (each would cost a whole prefill); their KV cache is the caller's to add, as
        ``measured_sequences`` says how many were measured."""
        started = time.perf_counter()
        tokens = worst_case_prompt_tokens(self.model, self.max_context_tokens or 2, self.max_batch_tokens)
        prompt = filler_prompt(tokens, self._vocab_size, self._default_stop_ids)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
        config = self._config_for(WARMUP_REQUEST, 1, rows=1, prompt_tokens=len(prompt))
        with torch.inference_mode():
            cast(Any, self.model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return {
            "prompt_tokens": len(prompt),
            "measured_sequences": 1,
            "touched_bytes": 0,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _config_for(
        self, request: GenerationRequest, max_new_tokens: int, *, rows: int = 1, prompt_tokens: int = 1
    ) -> GenerationConfig:
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

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that decode like it, up to ``max_sequences``."""
        first = self._pending.popleft()
        key = self._decoding(first.request)
        if key is None:
            return [first]
        batch, rest = [first], deque[Job]()
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

    def _run(self, batch: list[Job]) -> None:
        self._generate_rows(batch, post=lambda job, tokens: self._post(job, self._deliver, job, tokens))

    def _model_inputs(self, batch: list[Job], config: GenerationConfig) -> dict[str, torch.Tensor]:
        """What ``generate`` takes beside the rows' token ids, and the call's ``config`` adjusted for it: nothing
        for text (``runner/vision.py`` passes the rows' image tensors)."""
        return {}

    @torch.no_grad()
    def _generate_rows(self, batch: list[Job], post: Callable[[Job, list[int]], None]) -> None:
        """One left-padded ``generate`` call for ``batch``; ``post`` gets each row's new tokens."""
        first = batch[0].request
        if first.seed is not None and first.temperature > 0:
            torch.manual_seed(first.seed)
        device = self.model.device
        width = max(len(job.request.prompt_ids) for job in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, job in enumerate(batch):  # left padding: every row's last prompt token lines up
            prompt = job.request.prompt_ids
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
            mask[row, width - len(prompt) :] = 1
        config = self._config_for(
            first, max(job.request.max_new_tokens for job in batch), rows=len(batch), prompt_tokens=width
        )
        extra = self._model_inputs(batch, config)
        rows = _Rows(batch, post)
        routing = self.lora.routing if self.lora is not None else None
        if routing is not None:  # one adapter per row (LoraLinear broadcasts it over the row's tokens)
            routing.set(torch.tensor([[job.slot] for job in batch], dtype=torch.long, device=device))
        try:
            cast(Any, self.model).generate(  # PreTrainedModel's stubs leave out GenerationMixin
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                streamer=_RowsStreamer(rows),
                stopping_criteria=StoppingCriteriaList([_RowsCriteria(rows)]),
                **extra,
            )
        finally:
            if routing is not None:
                routing.set(None)
