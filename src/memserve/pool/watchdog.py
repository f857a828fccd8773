"""The watchdog's decisions, as pure functions tested as tables: the pool samples memory and acts on the answers.

- :func:`first_breach`: does one runner's sample go past its reservation plus the tolerance on a device?
  The limit is the reservation plus the larger of ``tolerance`` × the reservation and ``tolerance_min_bytes``
  (:func:`watchdog_limit_bytes`), so a small model's normal jitter never trips it.
- :func:`host_victim`: with the host (or our cgroup) below its floor of available memory, which runner to
  stop. A loading one first (its load is not done, so stopping it loses least and it is likely the one
  growing), then the one furthest past its reservation, then the largest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from memserve.pool.state import ModelState


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


__all__ = ["Breach", "Watched", "first_breach", "host_victim", "watchdog_limit_bytes"]
