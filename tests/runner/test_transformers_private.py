"""The private parts of transformers' continuous batching that the engines use are still where we use them.

``pyproject.toml`` caps transformers below the next minor version because of these names; before raising
the cap, run this module against the new version. Each failure lists every name that moved, so the fix
in ``runner/batching.py`` (and ``runner/sampling.py``, ``runner/fallback.py``) can be planned at once.
Why each one is used: the docstring of ``memserve.runner.batching`` and "Private parts of transformers we
use" in docs/design.md. No checkpoint is needed: a two-layer random Llama is built in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import pytest
import torch
import transformers
from transformers import GenerationConfig, GenerationMixin, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus, OutputRouter
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput, RequestState

from memserve.runner.batching import ContinuousBatchingEngine, continuous_batching_config
from memserve.runner.sampling import SamplingProcessors

WHERE = (
    "memserve's engines use these (see 'Private parts of transformers we use' in docs/design.md): adapt "
    "runner/batching.py, runner/sampling.py or runner/fallback.py before raising the transformers cap in pyproject.toml"
)


def _missing_attributes(owner: Any, dotted: list[str]) -> list[str]:
    """The dotted attribute paths of ``owner`` that do not resolve."""
    missing = []
    for path in dotted:
        value = owner
        for part in path.split("."):
            if not hasattr(value, part):
                missing.append(f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}.{path}")
                break
            value = getattr(value, part)
    return missing


def _missing_parameters(function: Any, names: list[str]) -> list[str]:
    parameters = inspect.signature(function).parameters
    return [f"{function.__qualname__}({name}=...)" for name in names if name not in parameters]


def _fail_if(missing: list[str]) -> None:
    if missing:
        pytest.fail(f"transformers {transformers.__version__} moved {', '.join(missing)}; {WHERE}", pytrace=False)


def _tiny_llama() -> Any:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=1,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=1, bos_token_id=0)
    return model


def test_the_classes_still_have_the_methods_and_parameters_the_engines_call() -> None:
    """Checked on the classes, with no model: the manager's API as the engine calls it, and the records it reads."""
    missing = _missing_attributes(
        ContinuousBatchingManager,
        [
            "start",
            "stop",
            "destroy",
            "is_running",
            "add_request",
            "get_result",
            "cancel_request",
            "register_result_handler",
        ],
    )
    missing += _missing_parameters(ContinuousBatchingManager.stop, ["block", "timeout", "hard_stop"])
    missing += _missing_parameters(
        ContinuousBatchingManager.add_request, ["request_id", "max_new_tokens", "streaming", "eos_token_id"]
    )
    if not any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(ContinuousBatchingManager.add_request).parameters.values()
    ):
        missing.append("ContinuousBatchingManager.add_request(**logit_processor_kwargs) (temperature, top_p)")
    missing += _missing_parameters(ContinuousBatchingManager.get_result, ["request_id", "timeout"])
    missing += _missing_parameters(
        GenerationMixin.init_continuous_batching, ["generation_config", "continuous_batching_config"]
    )
    missing += _missing_attributes(PreTrainedModel, ["set_attn_implementation"])
    missing += [
        f"GenerationOutput.{name}"
        for name in ("generated_tokens", "error")
        if name not in {f.name for f in dataclasses.fields(GenerationOutput)}
    ]
    missing += _missing_attributes(GenerationOutput, ["is_finished"])
    if "logit_processor_kwargs" not in {f.name for f in dataclasses.fields(RequestState)}:
        missing.append("RequestState.logit_processor_kwargs")
    if "state" not in FutureRequestState.__slots__:
        missing.append("FutureRequestState.state")
    router = OutputRouter()
    missing += _missing_attributes(router, ["_lock.__enter__", "result_handlers.pop"])
    missing += _missing_attributes(BackgroundThreadStatus(), ["fatal_error"])
    missing += _missing_parameters(
        ContinuousBatchingLogitsProcessorList.__init__,
        ["logits_processor", "per_request_processors", "drop_unsupported_processors"],
    )
    abstract = getattr(ContinuousBatchingLogitsProcessor, "__abstractmethods__", frozenset())
    missing += [
        f"ContinuousBatchingLogitsProcessor.{name}"
        for name in ("fill_defaults", "prepare_tensor_args")
        if name not in abstract
    ]
    if not hasattr(GenerationConfig(), "prefill_chunk_size"):  # the fallback's chunked prefill; unknown keys are kept
        missing.append("GenerationConfig.prefill_chunk_size")  # silently, so this would not fail anywhere else
    _fail_if(missing)


def test_sampling_processors_still_fit_the_library_list() -> None:
    processors = SamplingProcessors(transformers.LogitsProcessorList())
    missing = _missing_attributes(processors, ["logits_processor", "tensors_required", "do_processing"])
    _fail_if(missing)
    assert processors.tensors_required == 2  # temperature and top_p, one int32 row each


def test_a_config_for_a_plan_still_sets_every_size() -> None:
    """Every field continuous_batching_config sets still exists and keeps the value given (an unknown keyword
    would raise TypeError here; a renamed one would leave the library's default in place)."""
    config = continuous_batching_config(max_sequences=3, max_context_tokens=100, max_batch_tokens=64)
    expected = {
        "page_size": 64,
        "num_blocks": 3 * (2 + 1),
        "max_batch_tokens": 64,
        "max_requests_per_batch": 3,
        "max_memory_percent": 1.0,
        "allow_block_sharing": False,
        "safety_margin": 0.0,
        "per_request_processors": False,
        "max_queue_size": 0,
    }
    got = {name: getattr(config, name, "<missing>") for name in expected}
    moved = [
        f"ContinuousBatchingConfig.{name} (={value!r}, expected {expected[name]!r})"
        for name, value in got.items()
        if value != expected[name]
    ]
    _fail_if(moved)


def test_a_started_manager_still_has_what_the_engine_reads_and_swaps() -> None:
    """On a real (tiny, random) model: the attributes the engine swaps before start and reads after it."""
    model = _tiny_llama()
    missing = _missing_attributes(model.config, ["_attn_implementation"])
    _fail_if(missing)
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=1),
        continuous_batching_config=continuous_batching_config(
            max_sequences=2, max_context_tokens=64, max_batch_tokens=32
        ),
    )
    try:
        missing = _missing_attributes(
            manager,
            [
                "logit_processor.logits_processor",
                "output_router._lock",
                "output_router.result_handlers",
                "background_thread_status.fatal_error",
                "batch_processor",
                "_generation_thread",
            ],
        )  # the last: tests only
        _fail_if(missing)
        assert manager.batch_processor is None, "the batch processor is built by the generation thread, after start()"
    finally:
        manager.destroy()
    engine = ContinuousBatchingEngine(
        model, max_sequences=2, max_queue=0, max_context_tokens=64, max_batch_tokens=32, warmup=False
    )
    try:
        processor = engine._manager.batch_processor
        missing = _missing_attributes(
            processor,
            [
                "logit_processor",
                "cache.cache_tensor.nbytes",
                "cache.num_blocks",
                "cache.max_batch_tokens",
                "inputs_and_outputs",
            ],
        )
        _fail_if(missing)
        assert isinstance(processor.logit_processor, SamplingProcessors), "the swapped logit_processor was not taken"
        masks = getattr(processor.inputs_and_outputs, "attention_mask", None)
        assert isinstance(masks, dict) and masks, (
            f"transformers {transformers.__version__}: inputs_and_outputs.attention_mask is no longer a dict of "
            f"preallocated masks (got {type(masks).__name__}); the worst-case warm-up and the stats read it; {WHERE}"
        )
        assert engine.stats().extra["kv_cache_bytes"] == processor.cache.cache_tensor.nbytes
    finally:
        asyncio.run(engine.close())
