"""What the pool did, counted: loads, phases, evictions by reason, refusals by code, kills, crashes, retries.

``PoolCounters.hear`` is subscribed to the pool's ``EventLog`` (every pool event passes there, on the pool's
loop), so nothing is counted anywhere else but the one refusal that has no event (a full queue: under
overload an event per refused lease would flush the log). The families are the lifecycle part of
``/metrics`` (docs/metrics.md §1c); ``snapshot`` copies them for a scrape to render off the loop.

Every counter starts at 0 for each configured model and each value of its fixed labels, so that the first
event of a kind is a step from 0 to 1 that ``increase()`` sees, not a series that appears at 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from memserve.memory.planner import RUNGS
from memserve.pool.events import PoolEvent, PoolEventKind
from memserve.tally import LOAD_BUCKETS, RATIO_BUCKETS, Family, Labels, Tally, Values, increment, observe

LOADS = Family("memserve_model_loads", "counter", "Runner starts.", ("model", "rung"))
RESTARTS = Family("memserve_model_restarts", "counter", "Starts after a crash, kill or failed load.", ("model",))
EVICTIONS = Family(
    "memserve_model_evictions",
    "counter",
    "Ready runners stopped by memserve: make_room, keep_alive, unload (request or reload), shutdown.",
    ("model", "reason"),
)
REFUSALS = Family(
    "memserve_model_refusals",
    "counter",
    "Loads or leases refused, by error code: insufficient_memory (507), memory_busy (503), queue_full (429), ...",
    ("model", "code"),
)
KILLS = Family(
    "memserve_watchdog_kills",
    "counter",
    "Runners killed by the watchdog: reservation (past it by the tolerance) or host_floor (host below its floor).",
    ("model", "cause"),
)
CRASHES = Family(
    "memserve_model_crashes", "counter", "Ready runners that exited unasked (a watchdog kill included).", ("model",)
)
LOAD_FAILURES = Family("memserve_model_load_failures", "counter", "Loads that ended failed.", ("model",))
RETRIES = Family(
    "memserve_model_load_retries",
    "counter",
    "Loads tried again: same_rung (with what a kill taught) or lower_rung.",
    ("model", "kind"),
)
RAISES = Family(
    "memserve_model_reservation_raises",
    "counter",
    "Warm-ups that peaked above the reservation, which was raised.",
    ("model",),
)
PHASE_SECONDS = Family(
    "memserve_model_load_phase_seconds",
    "histogram",
    "Seconds per load phase (resolve, map, fault_in, warm_up, worst_case).",
    ("model", "phase"),
    LOAD_BUCKETS,
)
LOAD_SECONDS = Family(
    "memserve_model_load_duration_seconds", "histogram", "Seconds from runner start to ready.", ("model",), LOAD_BUCKETS
)
ESTIMATE_RATIO = Family(
    "memserve_load_estimate_ratio",
    "histogram",
    "Measured peak / planned bytes per load and device; outcome ready, or killed (by the watchdog while loading).",
    ("model", "device", "outcome"),
    RATIO_BUCKETS,
)
LAST_ESTIMATE_RATIO = Family(
    "memserve_model_estimate_ratio",
    "gauge",
    "The last ready load's measured peak / planned bytes.",
    ("model", "device"),
)

COUNTERS = (LOADS, RESTARTS, EVICTIONS, REFUSALS, KILLS, CRASHES, LOAD_FAILURES, RETRIES, RAISES)
HISTOGRAMS = (PHASE_SECONDS, LOAD_SECONDS, ESTIMATE_RATIO)
EVICTION_REASONS = ("make_room", "keep_alive", "unload", "shutdown")
"""The ``cause`` of a ``stopped`` event that is an eviction; the others (``load_failed``, ``retry``) are not."""
PRECREATED_REFUSALS = ("insufficient_memory", "memory_busy", "queue_full")
KILL_CAUSES = ("reservation", "host_floor")
RETRY_KINDS = {PoolEventKind.RETRY: "same_rung", PoolEventKind.RETRY_LOWER: "lower_rung"}
_ZEROS: dict[Family, tuple[tuple[str, ...], ...]] = {
    LOADS: (RUNGS,),
    RESTARTS: (),
    EVICTIONS: (EVICTION_REASONS,),
    REFUSALS: (PRECREATED_REFUSALS,),
    KILLS: (KILL_CAUSES,),
    CRASHES: (),
    LOAD_FAILURES: (),
    RETRIES: (tuple(RETRY_KINDS.values()),),
    RAISES: (),
}


class PoolCounters:
    """The lifecycle families of one pool, counted from its events. Touched only on the pool's loop."""

    def __init__(self, models: Iterable[str]) -> None:
        self.counts: dict[Family, dict[Labels, float]] = {family: {} for family in COUNTERS}
        self.tallies: dict[Family, dict[Labels, Tally]] = {family: {} for family in HISTOGRAMS}
        self.last_ratio: dict[Labels, float] = {}
        self._planned: dict[str, dict[str, int]] = {}  # each model's planned bytes at its last LOAD
        self._loading: set[str] = set()
        for model in models:
            for family, enumerations in _ZEROS.items():
                for value in enumerations[0] if enumerations else ("",):
                    self.counts[family][(model, value) if enumerations else (model,)] = 0

    def hear(self, event: PoolEvent) -> None:
        """Count one pool event (``EventLog.subscribe``'s listener)."""
        kind, model, fields = event.kind, event.model, event.fields
        if kind == PoolEventKind.LOAD:
            increment(self.counts[LOADS], (model, str(fields.get("rung"))))
            if _number(fields.get("after_failures")):
                increment(self.counts[RESTARTS], (model,))
            self._planned[model] = _sizes(fields.get("planned_bytes"))
            self._loading.add(model)
        elif kind == PoolEventKind.PHASE and _number(fields.get("seconds")) is not None:
            observe(self.tallies[PHASE_SECONDS], (model, str(fields.get("phase"))), LOAD_BUCKETS, fields["seconds"])
        elif kind == PoolEventKind.READY:
            self._loading.discard(model)
            if _number(fields.get("load_seconds")) is not None:
                observe(self.tallies[LOAD_SECONDS], (model,), LOAD_BUCKETS, fields["load_seconds"])
            planned = _sizes(fields.get("planned_bytes")) or self._planned.get(model, {})
            for device, peak in _sizes(fields.get("peak_bytes")).items():
                if planned.get(device, 0) > 0:
                    ratio = peak / planned[device]
                    observe(self.tallies[ESTIMATE_RATIO], (model, device, "ready"), RATIO_BUCKETS, ratio)
                    self.last_ratio[(model, device)] = ratio
        elif kind == PoolEventKind.STOPPED:
            self._loading.discard(model)
            if fields.get("cause") in EVICTION_REASONS:
                increment(self.counts[EVICTIONS], (model, str(fields["cause"])))
        elif kind == PoolEventKind.REFUSED:
            self._loading.discard(model)
            self.refused(model, str(fields.get("code") or "refused"))
        elif kind == PoolEventKind.WATCHDOG_KILL:
            increment(self.counts[KILLS], (model, "reservation" if "limit_bytes" in fields else "host_floor"))
            self._killed_while_loading(model, fields)
        elif kind == PoolEventKind.CRASH:
            increment(self.counts[CRASHES], (model,))
        elif kind == PoolEventKind.LOAD_FAILED:
            self._loading.discard(model)
            increment(self.counts[LOAD_FAILURES], (model,))
        elif kind in RETRY_KINDS:
            increment(self.counts[RETRIES], (model, RETRY_KINDS[kind]))  # type: ignore[index]
        elif kind == PoolEventKind.RESERVE:
            increment(self.counts[RAISES], (model,))

    def refused(self, model: str, code: str) -> None:
        """A load or lease of ``model`` refused with ``code`` (the pool calls this itself for a full queue)."""
        increment(self.counts[REFUSALS], (model, code))

    def snapshot(self) -> list[tuple[Family, Values]]:
        """Copies of every family, for a scrape to render off the loop."""
        families: list[tuple[Family, Values]] = [(family, dict(values)) for family, values in self.counts.items()]
        families += [
            (family, {labels: tally.copy() for labels, tally in tallies.items()})
            for family, tallies in self.tallies.items()
        ]
        families.append((LAST_ESTIMATE_RATIO, dict(self.last_ratio)))
        return families

    def _killed_while_loading(self, model: str, fields: Mapping[str, Any]) -> None:
        """A reservation kill during a load is an underestimate that cost the load: its ratio, outcome killed."""
        device, measured = fields.get("device"), _number(fields.get("measured_bytes"))
        planned = self._planned.get(model, {}).get(str(device), 0)
        if model in self._loading and measured is not None and planned > 0:
            observe(self.tallies[ESTIMATE_RATIO], (model, str(device), "killed"), RATIO_BUCKETS, measured / planned)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sizes(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(d): int(v) for d, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


__all__ = ["COUNTERS", "EVICTION_REASONS", "HISTOGRAMS", "LAST_ESTIMATE_RATIO", "PoolCounters"]
