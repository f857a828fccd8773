"""The statistics as tables: percentiles against numpy, a step's summary, and saturation detection."""

from __future__ import annotations

import numpy as np
import pytest

from memserve.bench.stats import (
    Percentiles,
    RequestRecord,
    Step,
    StepKind,
    StepStats,
    find_saturation,
    percentile,
    saturation_line,
    summarize,
)

C: StepKind = "concurrency"


def about(p: Percentiles | None) -> tuple[float, float, float]:
    """(p50, p90, p99), to compare with ``pytest.approx`` where interpolation leaves rounding."""
    assert p is not None
    return p.p50, p.p90, p.p99


@pytest.mark.parametrize(
    "values",
    [
        [3.0],
        [1.0, 2.0],
        [5.0, 1.0, 4.0, 2.0, 3.0],
        [0.1 * i * i for i in range(37)],
        [7.0, 7.0, 7.0, 1.0],
        list(np.random.default_rng(3).exponential(size=101)),
    ],
)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_percentile_is_numpys_linear_interpolation(values: list[float], fraction: float) -> None:
    assert percentile(values, fraction) == pytest.approx(float(np.percentile(values, fraction * 100)), rel=1e-12)


def test_percentiles_by_hand_and_of_nothing() -> None:
    # ranks 0..3 of [10, 20, 30, 40]: p50 at rank 1.5, p90 at 2.7, p99 at 2.97
    assert about(Percentiles.of([40.0, 10.0, 30.0, 20.0])) == pytest.approx((25.0, 37.0, 39.7))
    assert Percentiles.of([0.5]) == Percentiles(0.5, 0.5, 0.5)
    assert Percentiles.of([]) is None
    assert percentile([], 0.5) is None


def record(
    send: float,
    contents: list[float],
    finish: float,
    *,
    usage: int | None = None,
    prompt: int | None = None,
    error: str | None = None,
) -> RequestRecord:
    r = RequestRecord(
        send_seconds=send,
        finish_seconds=finish,
        content_seconds=contents,
        usage_output_tokens=usage,
        usage_prompt_tokens=prompt,
    )
    if error:
        r.fail(error, f"{error} happened")
    return r


def test_one_requests_numbers() -> None:
    r = record(1.0, [1.5, 1.75, 2.25, 2.5], 2.75, usage=4)
    assert r.ttft_seconds == 0.5
    assert r.itl_seconds == [0.25, 0.5, 0.25]
    assert r.e2e_seconds == 1.75
    assert r.tpot_seconds == (1.75 - 0.5) / 3
    # no usage: output tokens are the content chunks; a single token has no TPOT
    assert record(0.0, [0.25, 0.5], 1.0).output_tokens == 2
    assert record(0.0, [0.25], 1.0, usage=1).tpot_seconds is None
    assert record(0.0, [], 1.0).ttft_seconds is None


def test_a_step_summary() -> None:
    records = [
        record(0.0, [1.0, 2.0, 3.0], 3.0, usage=3, prompt=10),  # ttft 1, itl 1,1, tpot 1
        record(0.0, [2.0, 2.5, 3.0], 4.0, usage=5, prompt=12),  # ttft 2, itl .5,.5, tpot (4-2)/4 = .5
        record(1.0, [], 2.0, error="http_429"),
        record(2.0, [], 8.0, error="timeout"),
        record(3.0, [], 3.5, error="http_429"),
    ]
    s = summarize(Step(C, 4), records)
    assert (s.requests, s.successful_requests, s.failed_requests) == (5, 2, 3)
    assert s.errors == {"http_429": 2, "timeout": 1}
    assert s.error_examples == {"http_429": "http_429 happened", "timeout": "timeout happened"}
    assert s.error_rate == 0.6
    assert s.wall_seconds == 8.0  # first send 0 → last finish 8, failures included
    assert s.requests_per_second == 2 / 8
    assert s.output_tokens_per_second == 8 / 8
    assert s.prompt_tokens == 22
    assert about(s.ttft_seconds) == pytest.approx((1.5, 1.9, 1.99))
    assert s.itl_seconds == Percentiles(0.75, 1.0, 1.0)  # over [1, 1, .5, .5]
    assert about(s.tpot_seconds) == pytest.approx((0.75, 0.95, 0.995))
    assert about(s.e2e_seconds) == pytest.approx((3.5, 3.9, 3.99))
    data = s.to_json()
    assert data["concurrency"] == 4
    assert data["ttft_seconds"] == {"p50": 1.5, "p90": pytest.approx(1.9), "p99": pytest.approx(1.99)}
    assert data["errors"] == {"http_429": 2, "timeout": 1}


def test_an_all_failed_step_has_null_latencies() -> None:
    s = summarize(Step("rate", 2.0), [record(0.0, [], 1.0, error="connect")])
    assert (s.ttft_seconds, s.itl_seconds, s.tpot_seconds, s.e2e_seconds) == (None, None, None, None)
    assert s.output_tokens_per_second == 0.0
    assert s.prompt_tokens is None
    assert s.to_json()["ttft_seconds"] is None
    assert s.to_json()["rate_requests_per_second"] == 2.0


def stats(
    value: float, tokens_per_second: float, ttft_p50: float | None, *, failed: int = 0, kind: StepKind = C
) -> StepStats:
    ttft = None if ttft_p50 is None else Percentiles(ttft_p50, ttft_p50, ttft_p50)
    return StepStats(
        step=Step(kind, value),
        requests=16,
        successful_requests=16 - failed,
        errors={"http_429": failed} if failed else {},
        error_examples={},
        wall_seconds=1.0,
        requests_per_second=1.0,
        output_tokens_per_second=tokens_per_second,
        output_tokens=0,
        prompt_tokens=None,
        ttft_seconds=ttft,
        itl_seconds=None,
        tpot_seconds=None,
        e2e_seconds=None,
    )


@pytest.mark.parametrize(
    ("steps", "at", "reason", "message"),
    [
        # throughput doubles each step, TTFT flat: never saturates
        ([stats(1, 100, 0.1), stats(2, 200, 0.1), stats(4, 400, 0.11)], None, None, "no saturation up to 4 concurrent"),
        # +4% while TTFT ×2.3: the issue's own example
        (
            [stats(1, 100, 0.1), stats(4, 380, 0.1), stats(8, 395.2, 0.23), stats(16, 396, 0.5)],
            8,
            "throughput",
            "saturates at 8 concurrent: throughput +4% over 4 while TTFT p50 ×2.3",
        ),
        # flat throughput but TTFT only ×1.9: not yet; the next step doubles it
        (
            [stats(1, 100, 0.1), stats(2, 105, 0.19), stats(4, 106, 0.38)],
            4,
            "throughput",
            "saturates at 4 concurrent: throughput +1% over 2 while TTFT p50 ×2.0",
        ),
        # TTFT doubles but throughput still grows 10%: that is scaling, not saturation
        ([stats(1, 100, 0.1), stats(2, 110, 0.2)], None, None, "no saturation up to 2 concurrent"),
        # exactly +10% is enough growth; just under is not
        (
            [stats(1, 100, 0.1), stats(2, 109.99, 0.2)],
            2,
            "throughput",
            "saturates at 2 concurrent: throughput +10% over 1 while TTFT p50 ×2.0",
        ),
        # errors saturate at once, even on the first step
        (
            [stats(1, 100, 0.1, failed=3)],
            1,
            "errors",
            "saturates at 1 concurrent: 3 of 16 requests failed (http_429 ×3)",
        ),
        (
            [stats(1, 100, 0.1), stats(2, 200, 0.1), stats(4, 400, 0.1, failed=1)],
            4,
            "errors",
            "saturates at 4 concurrent: 1 of 16 requests failed (http_429 ×1)",
        ),
        # rates are named as rates
        (
            [stats(1, 50, 0.1, kind="rate"), stats(2.5, 52, 0.3, kind="rate")],
            2.5,
            "throughput",
            "saturates at 2.5 req/s: throughput +4% over 1 req/s while TTFT p50 ×3.0",
        ),
        # unknown TTFT cannot show growth
        ([stats(1, 100, None), stats(2, 100, 0.1)], None, None, "no saturation up to 2 concurrent"),
        ([], None, None, "no steps ran"),
    ],
)
def test_saturation(steps: list[StepStats], at: float | None, reason: str | None, message: str) -> None:
    found = find_saturation(steps)
    assert saturation_line(steps, found) == message
    if at is None:
        assert found is None
        return
    assert found is not None
    assert (found.step.value, found.reason) == (at, reason)
    assert found.to_json()["reason"] == reason
    if reason == "throughput":
        assert found.throughput_gain is not None and found.throughput_gain < 0.10
        assert found.ttft_p50_ratio is not None and found.ttft_p50_ratio >= 2.0
        assert found.previous is not None and found.previous.value < at
