"""The loop-owned histogram tallies: Prometheus's bucket rule, cumulative counts, and vLLM's bounds."""

from __future__ import annotations

import pytest

from memserve.tally import (
    ITL_BUCKETS,
    LOAD_BUCKETS,
    RATIO_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Tally,
    observe,
)

# vLLM 0.33.0, vllm/v1/metrics/buckets.py, written out here so that a change of ours shows as a failure
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0]  # fmt: skip
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def test_the_bounds_are_vllms() -> None:
    assert (list(TTFT_BUCKETS), len(TTFT_BUCKETS)) == (VLLM_TTFT, 22)
    assert (list(ITL_BUCKETS), len(ITL_BUCKETS)) == (VLLM_ITL, 19)
    assert (list(REQUEST_LATENCY_BUCKETS), len(REQUEST_LATENCY_BUCKETS)) == (VLLM_REQUEST, 21)
    assert TOKEN_BUCKETS[:7] == (1, 2, 5, 10, 20, 50, 100) and TOKEN_BUCKETS[-2:] == (500_000, 1_000_000)
    assert len(TOKEN_BUCKETS) == 19
    for bounds in (TTFT_BUCKETS, ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TOKEN_BUCKETS, LOAD_BUCKETS, RATIO_BUCKETS):
        assert list(bounds) == sorted(set(bounds)), "bounds must rise strictly"


@pytest.mark.parametrize(
    ("value", "bucket"),
    [(0.0, 0), (0.5, 0), (1.0, 0), (1.0000001, 1), (2.0, 1), (2.5, 2), (3.0, 2), (3.5, 3), (1e9, 3)],
)
def test_a_value_equal_to_a_bound_lands_in_that_bound(value: float, bucket: int) -> None:
    tally = Tally((1.0, 2.0, 3.0))
    tally.observe(value)
    assert tally.counts == [int(i == bucket) for i in range(4)]


def test_cumulative_counts_sum_and_copy() -> None:
    tally = Tally((1.0, 2.0))
    for value in (0.5, 1.5, 1.5, 7.0):
        tally.observe(value)
    tally.observe(0.25, times=2)
    assert tally.cumulative() == [("1.0", 3), ("2.0", 5), ("+Inf", 6)]
    assert (tally.count, tally.sum) == (6, 0.5 + 1.5 + 1.5 + 7.0 + 0.5)
    twin = tally.copy()
    tally.observe(1.0)
    assert twin.count == 6 and tally.count == 7, "a copy does not move with its original"
    twin.add(tally)
    assert twin.count == 13 and twin.cumulative()[-1] == ("+Inf", 13)


def test_observe_makes_a_tally_per_label_set() -> None:
    tallies: dict[tuple[str, ...], Tally] = {}
    observe(tallies, ("a",), (1.0,), 0.5)
    observe(tallies, ("a",), (1.0,), 2.0)
    observe(tallies, ("b",), (1.0,), 2.0)
    assert {k: v.counts for k, v in tallies.items()} == {("a",): [1, 1], ("b",): [0, 1]}
