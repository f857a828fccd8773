"""Histogram tallies owned by one event loop: a list of bucket counts and a sum, observed with one ``bisect``.

The gateway's request path and the pool's event listener count into these, with no lock and no
prometheus-client object (each of whose observations takes locks and scans its bounds: docs/metrics.md §2);
the ``/metrics`` handler copies them at scrape time and renders the copies in a thread. Nothing here imports
anything, so the pool and the gateway both use it.

The bucket tuples are vLLM's (``vllm/v1/metrics/buckets.py``, 0.33.0), so that a vLLM dashboard's quantiles
read the same on memserve's series.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
"""Seconds to the first token (vLLM's ``time_to_first_token_seconds``)."""
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Seconds between tokens, and per output token (vLLM's ``inter_token_latency_seconds``)."""
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
"""Seconds of a whole request, and of its queue time (vLLM's ``e2e_request_latency_seconds``)."""
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 10**6)
"""Tokens per request: 1 2 5 10 … 500000 1000000 (vLLM's 1-2-5 series, without its cap at the context length)."""
LOAD_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
"""Seconds of a load or one of its phases (no vLLM counterpart)."""
RATIO_BUCKETS: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 1, 1.05, 1.1, 1.25, 1.5, 2, 3)
"""Measured peak ÷ planned bytes of a load (no vLLM counterpart)."""


class Tally:
    """Bucket counts (one per bound, then +Inf) and the sum of what was observed.

    ``bisect_left`` puts a value equal to a bound in that bound's bucket: Prometheus's ``le`` (less or equal).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times (a chunk of several tokens observes its mean gap once per token)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def add(self, other: Tally) -> None:
        """Fold another tally of the same bounds into this one (a request's own gaps into its model's)."""
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Tally:
        twin = Tally(self.bounds)
        twin.counts, twin.sum = list(self.counts), self.sum
        return twin

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations ≤ le), ..., ("+Inf", all)]``, as a Prometheus histogram's buckets."""
        buckets, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            buckets.append((_le(bound), total))
        return buckets


def _le(bound: float) -> str:
    """The ``le`` label of a bound, as prometheus-client writes it (``floatToGoString``): ``1.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


Labels = tuple[str, ...]


def observe(tallies: dict[Labels, Tally], labels: Labels, bounds: tuple[float, ...], value: float) -> None:
    """Observe ``value`` in the tally of ``labels``, making it on first use."""
    tally = tallies.get(labels)
    if tally is None:
        tally = tallies[labels] = Tally(bounds)
    tally.observe(value)


def increment(counts: dict[Labels, float], labels: Labels, amount: float = 1) -> None:
    counts[labels] = counts.get(labels, 0) + amount


def copy_tallies(tallies: dict[Labels, Tally]) -> dict[Labels, Tally]:
    return {labels: tally.copy() for labels, tally in tallies.items()}


@dataclass(frozen=True)
class Family:
    """One metric family as ``/metrics`` declares it: its name (a counter's without ``_total``, which the
    exposition adds), type, help line, label names and, for a histogram, its bucket bounds."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    bounds: tuple[float, ...] = ()


Values = dict[Labels, float] | dict[Labels, Tally]
"""A family's samples: a number per label values (counter, gauge), or a tally (histogram)."""


__all__ = [
    "ITL_BUCKETS",
    "LOAD_BUCKETS",
    "RATIO_BUCKETS",
    "REQUEST_LATENCY_BUCKETS",
    "TOKEN_BUCKETS",
    "TTFT_BUCKETS",
    "Family",
    "Labels",
    "Tally",
    "Values",
    "copy_tallies",
    "increment",
    "observe",
]
