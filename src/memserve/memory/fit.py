"""Facts, request and plan for one model by name: what ``memserve fit`` prints and the gateway reuses.

Everything here is computed from headers and config files; nothing is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memserve.checkpoint.facts import CheckpointFacts, read_adapter_facts, with_adapters
from memserve.checkpoint.locate import read_facts
from memserve.memory.inventory import Inventory
from memserve.memory.planner import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    PlanResult,
    Policy,
    Request,
    plan,
)


def default_context(facts: CheckpointFacts) -> int:
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
    inventory: Inventory,
) -> tuple[CheckpointFacts, Request, PlanResult]:
    """Facts, request and plan for one model: what ``fit`` prints and the server will reuse."""
    facts = read_facts(model)
    facts = with_adapters(facts, tuple(read_adapter_facts(Path(a)) for a in adapters))
    request = Request(
        context_tokens=context if context is not None else default_context(facts),
        concurrency=concurrency,
        quantization=quantization,  # type: ignore[arg-type]  # validated by plan()
        min_context_tokens=min_context,
        max_batch_tokens=max_batch_tokens,
    )
    policy = Policy(allow_gpu=device != "cpu", allow_cpu=device != "cuda", allow_split=device == "auto")
    return facts, request, plan(facts, request, inventory, policy)


def fit_json(facts: CheckpointFacts, request: Request, result: PlanResult, inventory: Inventory) -> dict[str, Any]:
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
    }
