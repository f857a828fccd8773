"""Generation engines: one loaded ``transformers`` model behind the async :class:`Engine` protocol.

- :class:`ContinuousBatchingEngine` wraps transformers' continuous batching (a paged KV cache and a
  scheduler on the library's own thread). Its cache is sized from the Plan, never from the library's
  default (60% of *total* RAM, zero-filled).
- :class:`GenerateEngine` is the fallback for models continuous batching cannot serve: one worker
  thread running plain ``model.generate``, the requests waiting at each call batched together
  (static batching, left-padded).
- :func:`make_engine` tries the first and falls back to the second, saying why.

Each part has its own module, as each has its own threads: ``runner/front.py`` the async front both
engines share (validation, the bound on running and waiting sequences (``QueueFull``), streaming token
events, cancellation when the consumer goes away, and the stats), ``runner/batching.py`` continuous
batching with its sizing, ``runner/fallback.py`` the ``generate`` fallback with its worker thread. This
module chooses between them and re-exports their public names. One event loop should drive an engine at
a time. The private parts of transformers that continuous batching uses are listed in
``runner/batching.py``'s docstring.

Sampling semantics are OpenAI's: ``temperature == 0`` is greedy, otherwise temperature and top_p with
no top_k. Other processors from the model's ``generation_config.json`` (a repetition penalty, say)
apply in both engines, as they would in ``model.generate``. An empty ``stop_token_ids`` means the
generation config's eos ids; negative ids are dropped, so ``(-1,)`` asks for no stop token at all.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from transformers import GenerationConfig

from memserve.errors import GenerationFailed, InvalidArgument
from memserve.memory.estimate import CONTINUOUS_BATCHING, GENERATE
from memserve.runner.batching import (
    DEFAULT_PAGE_SIZE,
    ContinuousBatchingEngine,
    continuous_batching_config,
    kv_cache_blocks,
)
from memserve.runner.fallback import GenerateEngine
from memserve.wire.events import Engine

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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


def make_engine(
    model: PreTrainedModel,
    *,
    prefer: str = CONTINUOUS_BATCHING,
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
    if prefer not in (CONTINUOUS_BATCHING, GENERATE):
        raise InvalidArgument(
            f"unknown engine {prefer!r}; choose {CONTINUOUS_BATCHING!r} or {GENERATE!r}", param="prefer"
        )
    reason: str | None = None
    if prefer == CONTINUOUS_BATCHING:
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
