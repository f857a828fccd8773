"""The watchdog's decisions as tables: the limit scan, the host floor's victim, what a kill teaches, and the
words it says. Plain data, no pool."""

from __future__ import annotations

import pytest

from memserve.pool.state import ModelState
from memserve.pool.watchdog import (
    Breach,
    Watched,
    breach_reason,
    first_breach,
    floor_reason,
    host_victim,
    learned_bytes,
    watchdog_limit_bytes,
)

MiB = 1024**2
GiB = 1024**3


@pytest.mark.parametrize(
    ("reserved", "tolerance", "minimum", "limit"),
    [
        (10 * GiB, 0.10, 128 * MiB, 11 * GiB),  # the relative tolerance is the larger
        (GiB, 0.10, 128 * MiB, GiB + 128 * MiB),  # the minimum is the larger: a small model's jitter is allowed
        (0, 0.10, 128 * MiB, 128 * MiB),  # a device with no reservation: only the minimum
        (GiB, 0.0, 0, GiB),
    ],
)
def test_the_limit_is_the_reservation_plus_the_larger_tolerance(
    reserved: int, tolerance: float, minimum: int, limit: int
) -> None:
    assert watchdog_limit_bytes(reserved, tolerance, minimum) == limit


@pytest.mark.parametrize(
    ("sample", "reserved", "expected"),
    [
        ({}, {"cpu": GiB}, None),
        ({"cpu": GiB + 128 * MiB}, {"cpu": GiB}, None),  # exactly at the limit is allowed
        ({"cpu": GiB + 128 * MiB + 1}, {"cpu": GiB}, Breach("cpu", GiB + 128 * MiB + 1, GiB, GiB + 128 * MiB)),
        (
            {"cpu": GiB, "cuda:0": 9 * GiB},
            {"cpu": GiB, "cuda:0": 8 * GiB},
            Breach("cuda:0", 9 * GiB, 8 * GiB, 8 * GiB + int(8 * GiB * 0.05)),
        ),  # 5% of 8 GiB is above the minimum
        (
            {"cuda:0": 9 * GiB, "cpu": 2 * GiB},
            {"cpu": GiB, "cuda:0": 8 * GiB},  # both past: the sample's first
            Breach("cuda:0", 9 * GiB, 8 * GiB, 8 * GiB + int(8 * GiB * 0.05)),
        ),
        ({"cuda:1": 200 * MiB}, {"cpu": GiB}, Breach("cuda:1", 200 * MiB, 0, 128 * MiB)),  # a device never reserved
    ],
    ids=["no sample", "at the limit", "one byte past", "one device of two", "the first of two", "unreserved device"],
)
def test_first_breach(sample: dict[str, int], reserved: dict[str, int], expected: Breach | None) -> None:
    assert first_breach(sample, reserved, tolerance=0.05, tolerance_min_bytes=128 * MiB) == expected


def watched(name: str, state: ModelState, measured_gib: float, reserved_gib: float) -> Watched:
    return Watched(name, state, {"cpu": int(measured_gib * GiB)}, {"cpu": int(reserved_gib * GiB)})


READY, WARMING, LOADING = ModelState.READY, ModelState.WARMING, ModelState.LOADING


@pytest.mark.parametrize(
    ("available_gib", "runners", "victim"),
    [
        (2.0, [watched("a", READY, 3, 2)], None),  # at the floor: nothing to do
        (0.5, [], None),  # below it, but no runner of ours to stop
        (0.5, [watched("a", READY, 3, 2)], "a"),
        (0.5, [watched("big", READY, 9, 10), watched("new", WARMING, 1, 2)], "new"),  # loading ones first
        (0.5, [watched("a", READY, 4, 2), watched("b", READY, 8, 7)], "a"),  # then the furthest past its plan
        (0.5, [watched("a", READY, 4, 4), watched("b", READY, 8, 8)], "b"),  # then the largest
        (0.5, [watched("a", LOADING, 1, 1), watched("b", LOADING, 1, 1)], "a"),  # a tie: the first given
    ],
    ids=["above the floor", "nothing runs", "the only one", "loading first", "most over", "largest", "tie"],
)
def test_host_victim(available_gib: float, runners: list[Watched], victim: str | None) -> None:
    assert host_victim(int(available_gib * GiB), 2 * GiB, runners) == victim


@pytest.mark.parametrize(
    ("peak", "reserved", "learned"),
    [
        ({"cpu": GiB}, {"cpu": GiB}, {}),  # at its reservation: nothing to learn
        ({"cpu": GiB + 1}, {"cpu": GiB}, {"cpu": GiB + 1 + 128 * MiB}),  # past it: the peak plus the minimum
        ({"cpu": 10 * GiB}, {"cpu": 8 * GiB}, {"cpu": 10 * GiB + int(10 * GiB * 0.05)}),  # plus 5% when larger
        (
            {"cpu": GiB, "cuda:0": 9 * GiB},
            {"cpu": 2 * GiB, "cuda:0": 8 * GiB},
            {"cuda:0": 9 * GiB + int(9 * GiB * 0.05)},
        ),
        ({"cuda:1": MiB}, {"cpu": GiB}, {"cuda:1": 129 * MiB}),  # a device never reserved
        ({}, {"cpu": GiB}, {}),  # nothing seen
    ],
    ids=["at", "one byte past", "relative tolerance", "only the device past", "unreserved device", "no figures"],
)
def test_what_a_kill_teaches(peak: dict[str, int], reserved: dict[str, int], learned: dict[str, int]) -> None:
    assert learned_bytes(peak, reserved, tolerance=0.05, tolerance_min_bytes=128 * MiB) == learned


def test_the_reasons_name_the_figures_and_the_state() -> None:
    breach = Breach("cpu", 3 * GiB, 2 * GiB, 2 * GiB + 128 * MiB)
    assert breach_reason(breach, READY) == (
        "stopped by the watchdog: cpu use 3.0 GiB went past its plan of 2.0 GiB plus the tolerance "
        "(limit 2.1 GiB) while ready"
    )
    assert floor_reason(GiB // 2, 2 * GiB, WARMING) == (
        "stopped by the watchdog: host available memory 512.0 MiB fell below the floor 2.0 GiB while it was warming"
    )
