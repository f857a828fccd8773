"""What a runner is started with (:class:`PlanFile`: ``memserve fit --json``'s shape, read back with ``--plan
FILE``) and the defaults the gateway, pool and runner share (the default context, the queue per sequence).

Choosing an engine and planning a model by name is one level up, in ``engines/fit.py`` (it knows every engine).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.checkpoint.facts import CheckpointFacts
from memserve.checkpoint.gguf import GgufFacts
from memserve.errors import InvalidArgument
from memserve.memory.planner import DEFAULT_CONTEXT_TOKENS, QUEUE_PER_SEQUENCE, Plan


def queue_limit(max_queue: int | None, concurrency: int) -> int:
    """Requests allowed to wait beyond ``concurrency``: ``max_queue``, or ``QUEUE_PER_SEQUENCE`` per sequence.

    The gateway's admission and the runner's engine both size their queues here, so they agree.
    """
    return max_queue if max_queue is not None else QUEUE_PER_SEQUENCE * concurrency


ModelFacts = CheckpointFacts | GgufFacts  # what a model's headers say: a safetensors checkpoint's, or a GGUF file's


def default_context(facts: ModelFacts) -> int:
    """Like Ollama: a modest default context, never more than the model supports."""
    limit = facts.max_context_tokens
    return min(limit, DEFAULT_CONTEXT_TOKENS) if limit else DEFAULT_CONTEXT_TOKENS


@dataclass(frozen=True)
class PlanFile:
    """What a runner is started with: a model's source and its plan, and the limits the pool adds.

    The file is ``memserve fit --json`` output (``model.source`` and ``plan``; the rest is not read). The pool
    writes the same shape with two more keys inside ``plan``: ``reserved_bytes``, its reservation (a
    calibrated figure may be above the estimate), and ``max_queue``, the model's queue beyond its
    concurrency, so the runner admits what the gateway does. ``model.adapters`` lists the LoRA adapters the
    runner loads on the base, as ``{"name", "source"}`` (``fit --adapter DIR`` writes their facts there: an
    adapter without a name is called by its folder's name).
    """

    source: str
    plan: Plan
    reserved_bytes: dict[str, int] | None = None
    max_queue: int | None = None
    adapters: tuple[tuple[str, str], ...] = ()  # (name, source) of each LoRA adapter on the base

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
        model: dict[str, Any] = {"source": self.source}
        if self.adapters:
            model["adapters"] = [{"name": name, "source": source} for name, source in self.adapters]
        return {"model": model, "plan": {**self.plan.to_json(), **limits}}

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
            _adapters(model.get("adapters") or [] if isinstance(model, Mapping) else []),
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


def _adapters(listed: Any) -> tuple[tuple[str, str], ...]:
    """``model.adapters`` of a plan file as (name, source) pairs. ``fit --json`` writes each adapter's facts there
    (its folder as ``path``, no name): such an adapter is called by its folder's name."""
    pairs = []
    for adapter in listed if isinstance(listed, list) else [listed]:
        source = adapter.get("source") or adapter.get("path") if isinstance(adapter, Mapping) else None
        if not isinstance(source, str):
            raise InvalidArgument(f"the plan's model.adapters must be a list of {{name, source}}, got {listed!r}")
        pairs.append((str(adapter.get("name") or Path(source).name), source))
    return tuple(pairs)
