"""The watchdog's decisions, as pure functions tested as tables: the pool samples memory and acts on the answers.

- :func:`first_breach`: does one runner's sample go past its reservation plus the tolerance on a device?
  The limit is the reservation plus the larger of ``tolerance`` × the reservation and ``tolerance_min_bytes``
  (:func:`watchdog_limit_bytes`), so a small model's normal jitter never trips it.
- :func:`host_victim`: with the host (or our cgroup) below its floor of available memory, which runner to
  stop. A loading one first (its load is not done, so stopping it loses least and it is likely the one
  growing), then the one furthest past its reservation, then the largest.
- :func:`learned_bytes`: after a kill or a crash, what the next load of that plan reserves.

The loops that sample and act on these answers are ``pool/watching.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from memserve.pool.state import ModelState
from memserve.units import format_bytes


def watchdog_limit_bytes(reserved_bytes: int, tolerance: float, tolerance_min_bytes: int) -> int:
    """The most a runner may use on a device: its reservation plus the larger of the two tolerances."""
    return reserved_bytes + max(int(reserved_bytes * tolerance), tolerance_min_bytes)


@dataclass(frozen=True)
class Breach:
    """A device where a runner's sample went past its limit."""

    device: str
    measured_bytes: int
    reserved_bytes: int
    limit_bytes: int


def first_breach(
    sample_bytes: Mapping[str, int], reserved_bytes: Mapping[str, int], *, tolerance: float, tolerance_min_bytes: int
) -> Breach | None:
    """The first device (in the sample's order) used past its reservation plus the tolerance; None if none.

    A device sampled but not reserved has a reservation of 0, so only the minimum tolerance is allowed there.
    """
    for device, measured in sample_bytes.items():
        reserved = reserved_bytes.get(device, 0)
        limit = watchdog_limit_bytes(reserved, tolerance, tolerance_min_bytes)
        if measured > limit:
            return Breach(device, measured, reserved, limit)
    return None


def breach_reason(breach: Breach, state: ModelState) -> str:
    """Why the watchdog stopped a runner past its limit, as its event and the model's failure say it."""
    return (
        f"stopped by the watchdog: {breach.device} use {format_bytes(breach.measured_bytes)} went past its plan "
        f"of {format_bytes(breach.reserved_bytes)} plus the tolerance (limit {format_bytes(breach.limit_bytes)}) "
        f"while {state}"
    )


def floor_reason(available_bytes: int, floor_bytes: int, state: ModelState) -> str:
    """Why the watchdog stopped a runner when the host ran low."""
    return (
        f"stopped by the watchdog: host available memory {format_bytes(available_bytes)} fell below the floor "
        f"{format_bytes(floor_bytes)} while it was {state}"
    )


def learned_bytes(
    peak_bytes: Mapping[str, int], reserved_bytes: Mapping[str, int], *, tolerance: float, tolerance_min_bytes: int
) -> dict[str, int]:
    """What the next load of a plan reserves after its runner was seen at ``peak_bytes``; {} when within it.

    The peak is a lower bound of what the plan needs (a killed runner was still growing, and samples are
    apart), so each device past its reservation gets the watchdog's own tolerance on top: the overshoot the
    operator already calls normal, never rounding to nothing on a small model, so that repeated kills end in
    a reservation that holds or one that does not fit (a clean 507).
    """
    return {
        device: watchdog_limit_bytes(peak, tolerance, tolerance_min_bytes)
        for device, peak in peak_bytes.items()
        if peak > reserved_bytes.get(device, 0)
    }


@dataclass(frozen=True)
class Watched:
    """A live runner as the host watchdog sees it."""

    name: str
    state: ModelState
    measured_bytes: Mapping[str, int]  # its last sample, per device ({} before the first)
    reserved_bytes: Mapping[str, int]

    @property
    def over_bytes(self) -> int:
        """How far its whole sample is past its whole reservation (negative when under it)."""
        return sum(self.measured_bytes.values()) - sum(self.reserved_bytes.values())


def host_victim(available_bytes: int, floor_bytes: int, runners: Sequence[Watched]) -> str | None:
    """The runner to stop when ``available_bytes`` fell below ``floor_bytes``; None when it did not, or none runs.

    Loading runners first, then the furthest past its reservation, then the largest sample; on a tie the
    first in ``runners``' order.
    """
    if available_bytes >= floor_bytes or not runners:
        return None
    victim = max(runners, key=lambda r: (r.state.loading, r.over_bytes, sum(r.measured_bytes.values())))
    return victim.name


__all__ = [
    "Breach",
    "Watched",
    "breach_reason",
    "first_breach",
    "floor_reason",
    "host_victim",
    "learned_bytes",
    "watchdog_limit_bytes",
]
