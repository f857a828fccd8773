"""Facts, request and plan for one model by name: what ``memserve fit`` prints and the gateway reuses.

Everything here is computed from headers and config files; nothing is loaded. A runner is started with
the same JSON (``--plan FILE``), read back as a :class:`PlanFile`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.checkpoint.facts import CheckpointFacts, read_adapter_facts, with_adapters
from memserve.checkpoint.gguf import GgufFacts, read_gguf_facts
from memserve.checkpoint.locate import find_gguf, read_facts
from memserve.engines import engines_for, llamacpp
from memserve.engines.vllm import with_vllm
from memserve.errors import InvalidArgument
from memserve.memory.estimate import CONTINUOUS_BATCHING, Engine
from memserve.memory.inventory import Inventory
from memserve.memory.planner import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    Plan,
    PlanResult,
    Policy,
    Request,
    plan,
)

QUEUE_PER_SEQUENCE = 4  # requests allowed to wait per sequence generated at once, unless max_queue says otherwise


def queue_limit(max_queue: int | None, concurrency: int) -> int:
    """Requests allowed to wait beyond ``concurrency``: ``max_queue``, or ``QUEUE_PER_SEQUENCE`` per sequence.

    The gateway's admission and the runner's engine both size their queues here, so they agree.
    """
    return max_queue if max_queue is not None else QUEUE_PER_SEQUENCE * concurrency


ModelFacts = CheckpointFacts | GgufFacts  # what a model's headers say: a safetensors checkpoint's, or a GGUF file's


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
    return with_vllm(facts, request, inventory, policy, plan(facts, request, inventory, policy), runner=runner)


def default_context(facts: ModelFacts) -> int:
    """Like Ollama: a modest default context, never more than the model supports."""
    limit = facts.max_context_tokens
    return min(limit, DEFAULT_CONTEXT_TOKENS) if limit else DEFAULT_CONTEXT_TOKENS


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
    inventory: Inventory,
) -> tuple[ModelFacts, Request, PlanResult]:
    """Facts, request and plan for one model: what ``fit`` prints and the server will reuse.

    ``runner`` is the engine asked for, or ``auto`` (``plan_model``)."""
    facts = read_model_facts(model)
    if adapters and isinstance(facts, GgufFacts):
        raise InvalidArgument(
            f"{model} is a GGUF model served by llama.cpp, which memserve gives no LoRA adapters yet; drop "
            "--adapter or serve the safetensors checkpoint"
        )
    if isinstance(facts, CheckpointFacts):
        facts = with_adapters(facts, tuple(read_adapter_facts(Path(a)) for a in adapters))
    request = Request(
        context_tokens=context if context is not None else default_context(facts),
        concurrency=concurrency,
        quantization=quantization,  # type: ignore[arg-type]  # validated by plan()
        min_context_tokens=min_context,
        max_batch_tokens=max_batch_tokens,
        engine=engine,
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


@dataclass(frozen=True)
class PlanFile:
    """What a runner is started with: a model's source and its plan, and the limits the pool adds.

    The file is ``memserve fit --json`` output (``model.source`` and ``plan``; the rest is not read). The pool
    writes the same shape with two more keys inside ``plan``: ``reserved_bytes``, its reservation (a
    calibrated figure may be above the estimate), and ``max_queue``, the model's queue beyond its
    concurrency, so the runner admits what the gateway does.
    """

    source: str
    plan: Plan
    reserved_bytes: dict[str, int] | None = None
    max_queue: int | None = None

    @property
    def reservation_bytes(self) -> dict[str, int]:
        """What the runner must stay within per device: the pool's reservation, else the plan's own totals."""
        return dict(self.reserved_bytes) if self.reserved_bytes else self.plan.reserved_bytes

    @property
    def queue(self) -> int:
        """Requests the runner lets wait beyond the plan's concurrency."""
        return queue_limit(self.max_queue, self.plan.concurrency)

    def to_json(self) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if self.reserved_bytes is not None:
            limits["reserved_bytes"] = dict(self.reserved_bytes)
        if self.max_queue is not None:
            limits["max_queue"] = self.max_queue
        return {"model": {"source": self.source}, "plan": {**self.plan.to_json(), **limits}}

    @classmethod
    def from_json(cls, data: Any) -> PlanFile:
        """Read :meth:`to_json`'s shape (or ``fit --json``'s); InvalidArgument says what is missing."""
        model = data.get("model") if isinstance(data, Mapping) else None
        plan_json = data.get("plan") if isinstance(data, Mapping) else None
        source = model.get("source") if isinstance(model, Mapping) else None
        if not isinstance(plan_json, Mapping) or not isinstance(source, str):
            raise InvalidArgument(
                "the plan file has no plan (nothing fit?) or no model source; "
                "expected the output of memserve fit MODEL --json with a plan"
            )
        reserved = plan_json.get("reserved_bytes")
        max_queue = plan_json.get("max_queue")
        if reserved is not None and not (
            isinstance(reserved, Mapping)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in reserved.values())
        ):
            raise InvalidArgument(f"the plan's reserved_bytes must map devices to byte counts, got {reserved!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise InvalidArgument(f"the plan's max_queue must be a whole number, 0 or more, got {max_queue!r}")
        return cls(
            source,
            Plan.from_json(plan_json),
            None if reserved is None else {str(d): int(v) for d, v in reserved.items()},
            max_queue,
        )

    @classmethod
    def read(cls, path: Path) -> PlanFile:
        """The plan file at ``path``; InvalidArgument when it cannot be read or is not a plan."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgument(
                f"cannot read plan file {path}: {exc}; write one with memserve fit MODEL --json"
            ) from exc
        try:
            return cls.from_json(data)
        except InvalidArgument as exc:
            raise InvalidArgument(f"plan file {path}: {exc.message}") from None
