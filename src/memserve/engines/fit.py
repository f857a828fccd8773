"""Facts, request and plan for one model by name: what ``memserve fit`` prints and the gateway and pool reuse.

Everything here is computed from headers and config files; nothing is loaded. This is the one place that
knows which engine reads which format (``plan_model``), so it sits above the engines' own modules; a runner
is started with the same JSON (``--plan FILE``), read back as ``memory/fit.py``'s ``PlanFile``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memserve.checkpoint.encoders import local_encoder_facts
from memserve.checkpoint.facts import CheckpointFacts
from memserve.checkpoint.gguf import GgufFacts, read_gguf_facts
from memserve.checkpoint.locate import find_gguf, read_facts, with_adapter_sources
from memserve.engines import engines_for, llamacpp
from memserve.engines.vllm import with_vllm
from memserve.errors import InvalidArgument
from memserve.memory.encoders import encoder_plan
from memserve.memory.estimate import CONTINUOUS_BATCHING, IMAGE_TEXT, Engine
from memserve.memory.fit import ModelFacts, default_context
from memserve.memory.inventory import Inventory
from memserve.memory.planner import DEFAULT_MAX_BATCH_TOKENS, PlanResult, Policy, Request, plan
from memserve.wire.images import ImageLimits

__all__ = ["fit_json", "fit_result", "plan_model", "read_model_facts"]


def read_model_facts(source: str) -> ModelFacts:
    """The facts of the model at ``source``: a GGUF file (or a folder holding one) is read from its own header
    for llama.cpp; anything else is a transformers checkpoint (``read_facts``)."""
    gguf = find_gguf(source)
    return read_gguf_facts(gguf, source=source) if gguf is not None else read_facts(source)


def plan_model(
    facts: ModelFacts, request: Request, inventory: Inventory, policy: Policy, runner: str = "auto"
) -> PlanResult:
    """Every engine's rungs for the model, and the first that fits: the one place that knows which engine
    reads which format. A GGUF file is llama.cpp's; a checkpoint is memserve's runner's, and vLLM's on a CUDA
    host where it is installed (``engines.vllm.with_vllm``). ``runner`` names the engine asked for, or ``auto``."""
    if isinstance(facts, GgufFacts):
        if runner not in ("auto", "llama.cpp"):
            raise InvalidArgument(
                f"{facts.source} is a GGUF file, which only llama.cpp serves; set the model's runner to auto or "
                f"llama.cpp (it was {runner}), or point it at the safetensors checkpoint"
            )
        return llamacpp.plan(facts, request, inventory, policy)
    if runner == "llama.cpp":
        raise InvalidArgument(
            f"{facts.source} is not a GGUF file, and llama.cpp serves GGUF files only; set the model's runner to "
            "auto, transformers or vllm, or point it at a .gguf file"
        )
    encoder = local_encoder_facts(facts.source)
    if encoder is not None:  # embeddings and classification: memserve's encoder runner (memory/encoders.py)
        return encoder_plan(facts, encoder, request, inventory, policy)
    if isinstance(facts, CheckpointFacts) and facts.vision is not None and request.engine != IMAGE_TEXT:
        request = replace(request, engine=IMAGE_TEXT)  # images need the processor and generate (runner/vision.py)
    return with_vllm(facts, request, inventory, policy, plan(facts, request, inventory, policy), runner=runner)


def fit_result(
    model: str,
    *,
    context: int | None = None,
    concurrency: int = 1,
    quantization: str = "auto",
    min_context: int | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    adapters: tuple[str, ...] = (),
    device: str = "auto",
    engine: Engine = CONTINUOUS_BATCHING,
    runner: str = "auto",
    images: ImageLimits | None = None,
    inventory: Inventory,
) -> tuple[ModelFacts, Request, PlanResult]:
    """Facts, request and plan for one model: what ``fit`` prints and the server will reuse.

    ``runner`` is the engine asked for, or ``auto`` (``plan_model``)."""
    facts = with_adapter_sources(read_model_facts(model), adapters)
    if isinstance(facts, CheckpointFacts) and facts.vision is not None:
        engine = IMAGE_TEXT  # as plan_model would: the request fit prints says so
    request = Request(
        context_tokens=context if context is not None else default_context(facts),
        concurrency=concurrency,
        quantization=quantization,  # type: ignore[arg-type]  # validated by plan()
        min_context_tokens=min_context,
        max_batch_tokens=max_batch_tokens,
        engine=engine,
        images=images or ImageLimits(),
    )
    policy = Policy(allow_gpu=device != "cpu", allow_cpu=device != "cuda", allow_split=device == "auto")
    return facts, request, plan_model(facts, request, inventory, policy, runner)


def fit_json(facts: ModelFacts, request: Request, result: PlanResult, inventory: Inventory) -> dict[str, Any]:
    """The public shape of ``fit --json`` (the server's /api/fit answers the same)."""
    return {
        "model": facts.summary(),
        "request": request.to_json(),
        "devices": {
            d.name: {
                "kind": d.kind,
                "description": d.description,
                "total_bytes": d.total_bytes,
                "free_bytes": d.free_bytes,
                "budget_bytes": d.budget_bytes,
                "headroom_bytes": d.headroom_bytes,
                "usable_bytes": d.usable_bytes,
            }
            for d in inventory.devices
        },
        **result.to_json(),
        "engines": [
            e.to_json()
            for e in engines_for(has_gpu=bool(inventory.gpus), model_format=facts.format, gguf=facts.format == "gguf")
        ],
    }
