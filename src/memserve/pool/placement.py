"""Which plan and reservation a load of one model uses: the ladder over the pool's whole capacity, priced with
what the calibration measured for each plan. No side effects: the pool records a choice's notes (the
events that say why) only once it uses the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memserve.config import ModelConfig
from memserve.engines.fit import plan_model
from memserve.errors import InsufficientMemory, InvalidArgument, MemoryBusy
from memserve.memory.fit import ModelFacts, default_context
from memserve.memory.inventory import Inventory
from memserve.memory.planner import RUNGS, Plan, Policy, Request
from memserve.pool.events import PoolEventKind, sizes
from memserve.pool.ledger import Calibration, Ledger, calibrated, checkpoint_files, checkpoint_fingerprint, plan_key
from memserve.units import format_bytes

Note = tuple[PoolEventKind, dict[str, Any]]


@dataclass(frozen=True)
class Choice:
    """A plan, the bytes to reserve for it, the policy the search started from, and the events that say why."""

    policy: Policy
    plan: Plan
    reserved_bytes: dict[str, int]
    notes: list[Note] = field(default_factory=list)


def request_for(config: ModelConfig, facts: ModelFacts, options: Mapping[str, int]) -> Request:
    """What to plan for: the model's configuration, with one load's options (context, concurrency) on top."""
    context = options.get("context_tokens") or config.context_tokens or default_context(facts)
    floor = config.policy.min_context_tokens  # a load asking for less context than the floor lowers the floor
    return Request(
        context_tokens=context,
        concurrency=options.get("concurrency") or config.concurrency,
        quantization=config.policy.quantization,
        min_context_tokens=None if floor is None else min(floor, context),
        engine=config.engine,
        images=config.images.limits(),
    )


def load_options(name: str, *, context_tokens: int | None, concurrency: int | None) -> dict[str, int]:
    """The options of one ``load`` that were given, each a whole number of 1 or more (InvalidArgument otherwise)."""
    options: dict[str, int] = {}
    for key, value, what, unit in (
        ("context_tokens", context_tokens, "context", "tokens"),
        ("concurrency", concurrency, "concurrency", "sequences"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(
                f"{what} must be a whole number of {unit}, 1 or more; got {value!r}. "
                f"Leave it out to use the {what} configured for {name!r}",
                param=what,
            )
        options[key] = value
    return options


def policy_for(config: ModelConfig) -> Policy:
    return Policy(
        allow_gpu=config.policy.allow_gpu, allow_split=config.policy.allow_split, allow_cpu=config.policy.allow_cpu
    )


def fingerprint(facts: ModelFacts) -> str:
    folder = Path(facts.source)
    return checkpoint_fingerprint(facts.source, checkpoint_files(folder) if folder.is_dir() else [])


class Placement:
    """Plans for the pool: ``ledger`` gives the usable bytes, ``calibration`` the measured figures, and
    ``capacity`` the whole capacity as an inventory with nothing held (what a plan may use at most)."""

    def __init__(self, ledger: Ledger, calibration: Calibration, capacity: Callable[[], Inventory]) -> None:
        self.ledger, self.calibration, self._capacity = ledger, calibration, capacity

    def first_choice(
        self,
        name: str,
        config: ModelConfig,
        skip_rungs: frozenset[str],
        facts: ModelFacts,
        options: Mapping[str, int],
    ) -> Choice:
        """The choice a load starts with.

        The rungs that repeated kills ruled out (``skip_rungs``) are a preference, not a ban: when nothing below
        them fits, they come back one at a time from the lowest, each with the reservation its kills taught. So
        the model is refused only for what it cannot fit even alone, and the 507's message never blames a skip.
        """
        base = policy_for(config)
        try:
            return self.choose(name, config, facts, replace(base, skip_rungs=skip_rungs), options)
        except InsufficientMemory as error:
            if not skip_rungs:
                raise
            refusal = error
        for rung in reversed([r for r in RUNGS if r in skip_rungs]):
            lifted = replace(base, skip_rungs=frozenset(RUNGS[: RUNGS.index(rung)]))
            try:
                choice = self.choose(name, config, facts, lifted, options)
            except InsufficientMemory as error:
                refusal = error
                continue
            retry = (
                PoolEventKind.RETRY,
                {
                    "rung": choice.plan.rung,
                    "reserved_bytes": choice.reserved_bytes,
                    "reason": f"nothing below {rung} fits or is allowed, so {choice.plan.rung} is tried again",
                },
            )
            return replace(choice, notes=[*choice.notes, retry])
        raise refusal

    def choose(
        self, name: str, config: ModelConfig, facts: ModelFacts, policy: Policy, options: Mapping[str, int]
    ) -> Choice:
        """The first plan on the ladder whose reservation fits the pool's capacity, and that reservation.

        The planner fits its estimate; the reservation is what the plan was measured to use where that is
        known (:meth:`reservation`). A measured figure too big for the capacity moves the load one rung lower:
        that is planning with what is known, not a retry, so ``retry_lower`` does not gate it. With nothing
        lower, the first plan is loaded with all the capacity there is (its reservation capped): a figure
        measured once, perhaps under a request no plan admits, must not refuse a model for good whose
        estimate fits; the watchdog still stops it past the capacity plus the tolerance. Only a model whose
        estimate does not fit even with nothing else loaded is refused (the planner's NoFit, 507).
        """
        usable, start = self.ledger.usable_bytes(), policy
        first = planned = self.plan(name, config, facts, policy, options)
        notes: list[Note] = []
        while True:
            need = self.reservation(facts, planned)
            short = {d: n for d, n in need.items() if n > usable.get(d, 0)}
            if not short:
                return Choice(start, planned, need, notes)
            rung = planned.rung
            estimate = {d: device.total_bytes for d, device in planned.devices.items() if d in short}
            why = (
                f"as {rung} it needs {sizes(short)} (learned from a runner with this plan; estimated "
                f"{sizes(estimate)}) but at most {sizes({d: usable.get(d, 0) for d in short})} is usable"
            )
            policy = policy.below(rung)
            try:
                planned = self.plan(name, config, facts, policy, options)
            except InsufficientMemory:
                capped = {d: min(n, usable.get(d, 0)) for d, n in self.reservation(facts, first).items()}
                why = notes[0][1]["reason"] if notes else why
                return Choice(
                    start,
                    first,
                    capped,
                    [
                        (
                            PoolEventKind.RESERVATION_CAPPED,
                            {
                                "rung": first.rung,
                                "reserved_bytes": capped,
                                "reason": f"{why}, and no lower rung on the ladder fits or is allowed: it is loaded "
                                "with all that is usable, and the watchdog stops it past that plus the tolerance",
                            },
                        )
                    ],
                )
            notes.append((PoolEventKind.RUNG_LOWER, {"failed_rung": rung, "rung": planned.rung, "reason": why}))

    def plan(
        self, name: str, config: ModelConfig, facts: ModelFacts, policy: Policy, options: Mapping[str, int]
    ) -> Plan:
        """The planner's plan over the whole capacity; InsufficientMemory (507) with its NoFit when none fits."""
        request, capacity = request_for(config, facts, options), self._capacity()
        result = plan_model(facts, request, capacity, policy, config.runner)
        if result.plan is None:
            assert result.nofit is not None
            raise InsufficientMemory(
                f"model {name!r} cannot fit on this server even with nothing else loaded: {result.nofit.message}",
                param="model",
            )
        return result.plan

    def refuse_if_never(self, name: str, need: Mapping[str, int], pinned: list[str]) -> None:
        """InsufficientMemory when the ``pinned`` models alone leave too little room for ``need``: waiting cannot
        help, and evicting them is not allowed."""
        usable = self.ledger.usable_bytes()
        for device, needed in need.items():
            held = sum(self.ledger.held(other).get(device, 0) for other in pinned)
            if needed > usable.get(device, 0) - held:
                raise InsufficientMemory(
                    f"model {name!r} needs {format_bytes(needed)} on {device}; {format_bytes(usable.get(device, 0))} "
                    f"is usable there and pinned models ({', '.join(pinned)}) hold {format_bytes(held)}; unpin one "
                    "or raise the budget",
                    param="model",
                )

    def busy(self, name: str, need: Mapping[str, int], holders: list[str], waited_seconds: float) -> MemoryBusy:
        """The 503 for a load that waited ``waited_seconds`` for room held by busy models (``holders``)."""
        return MemoryBusy(
            f"model {name!r} needs {sizes(need)} but only {sizes(self.ledger.free_bytes())} is free, and the rest "
            f"is held by busy models: {', '.join(holders) or 'nothing'}; waited {waited_seconds:.0f} s. Retry "
            "later, or raise memory_wait_seconds",
            retry_after_seconds=5.0,
        )

    def reservation(self, facts: ModelFacts, planned: Plan) -> dict[str, int]:
        """The bytes to reserve for ``planned``: what the calibration measured for it, else its estimate."""
        return calibrated(planned.reserved_bytes, self.calibration.get(fingerprint(facts), plan_key(planned)))


__all__ = ["Choice", "Placement", "fingerprint", "load_options", "policy_for", "request_for"]
