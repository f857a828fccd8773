"""The report's arithmetic as units: Wilson intervals, percentiles, busy time."""

from __future__ import annotations

import pytest

from memserve.compare.stats import busy_seconds, percentile, wilson_interval


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        (0, 10, 0.0, 0.27753),  # never 0 wide at 0 %
        (10, 10, 0.72247, 1.0),
        (5, 10, 0.23659, 0.76341),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), method 3: 81/263
        (1, 1, 0.20655, 1.0),
    ],
)
def test_wilson_interval_known_values(successes: int, trials: int, low: float, high: float) -> None:
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_without_trials_and_out_of_range() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="between 0 and trials"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 90, 3.7),  # numpy.percentile's default (linear)
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),  # unsorted input
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        ([7.0], 99, 7.0),
        ([], 50, None),
    ],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(
    ("intervals", "seconds"),
    [
        ([], 0.0),
        ([(0.0, 2.0)], 2.0),
        ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # overlapping requests count once
        ([(0.0, 1.0), (5.0, 6.0)], 2.0),  # the pause between two runs does not count
        ([(5.0, 6.0), (0.0, 10.0), (2.0, 3.0)], 10.0),  # nested, unsorted
        ([(0.0, 1.0), (1.0, 2.0)], 2.0),  # touching
    ],
)
def test_busy_seconds_is_the_union(intervals: list[tuple[float, float]], seconds: float) -> None:
    assert busy_seconds(intervals) == pytest.approx(seconds)
