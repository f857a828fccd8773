"""Per-request records in, per-step summaries and the saturation point out. Pure: no I/O, no clock.

Definitions (they follow vLLM's ``benchmark_serving``):

- **TTFT** (time to first token): send → the first chunk carrying content (a non-empty ``delta.content``
  or ``text``). A role-only opening chunk does not count.
- **ITL** (inter-token latency): the gaps between successive content chunks. A step's ITL percentiles
  are over all gaps of all successful requests in the step.
- **TPOT** (time per output token) of one request: ``(e2e − TTFT) / (output_tokens − 1)``, only for
  requests with more than one output token.
- **E2E**: send → the end of the stream (``data: [DONE]``, or the close of a stream that gave its finish_reason).
- **output tokens**: ``usage.completion_tokens`` when the server sends usage, else the number of content
  chunks. **prompt tokens**: ``usage.prompt_tokens`` when the server sends it, else the count from the
  local tokenizer (if any), else unknown.
- **Percentiles**: linear interpolation between closest ranks (numpy's default); one value → that
  value; no values → None (``null`` in JSON).
- A step's **output tokens/s**: the output tokens of its successful requests ÷ the step's wall time
  (first send → last finish, over all its requests). **requests/s**: successful requests ÷ the same.
- **Saturation**: the first step where errors appear, or where throughput gains less than 10% while
  TTFT p50 at least doubles, both relative to the previous step.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Percentiles",
    "RequestRecord",
    "Saturation",
    "Step",
    "StepKind",
    "StepStats",
    "find_saturation",
    "percentile",
    "saturation_line",
    "summarize",
]

MIN_THROUGHPUT_GAIN = 0.10
"""Below this gain over the previous step, throughput has stopped growing."""
TTFT_GROWTH = 2.0
"""TTFT p50 at least this many times the previous step's: requests are queueing."""

StepKind = Literal["concurrency", "rate"]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile by linear interpolation between closest ranks, as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Percentiles:
    """p50, p90 and p99 of one latency, in seconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        """None when there are no values (JSON ``null``), so an empty step never reads as zero latency."""
        if not values:
            return None
        p50, p90, p99 = (percentile(values, q) for q in (0.50, 0.90, 0.99))
        assert p50 is not None and p90 is not None and p99 is not None
        return cls(p50, p90, p99)

    def to_json(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass
class RequestRecord:
    """What one request did, as times on the load generator's clock (seconds; only differences matter)."""

    send_seconds: float
    finish_seconds: float = math.nan
    content_seconds: list[float] = field(default_factory=list)
    """When each content chunk was parsed."""
    usage_output_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    local_prompt_tokens: int | None = None
    error_kind: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error_message = kind, message

    @property
    def ttft_seconds(self) -> float | None:
        return self.content_seconds[0] - self.send_seconds if self.content_seconds else None

    @property
    def itl_seconds(self) -> list[float]:
        times = self.content_seconds
        return [later - earlier for earlier, later in itertools.pairwise(times)]

    @property
    def e2e_seconds(self) -> float:
        return self.finish_seconds - self.send_seconds

    @property
    def output_tokens(self) -> int:
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.content_seconds)

    @property
    def prompt_tokens(self) -> int | None:
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.local_prompt_tokens

    @property
    def tpot_seconds(self) -> float | None:
        ttft = self.ttft_seconds
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_seconds - ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Step:
    """One load level: a number of concurrent requests (closed loop) or an arrival rate (open loop)."""

    kind: StepKind
    value: float

    def label(self) -> str:
        """``8 concurrent`` or ``2 req/s``."""
        return f"{_number(self.value)} concurrent" if self.kind == "concurrency" else f"{_number(self.value)} req/s"

    def short(self) -> str:
        """``8`` or ``2 req/s``, for "over 4" in the saturation line."""
        return _number(self.value) if self.kind == "concurrency" else self.label()

    def to_json(self) -> dict[str, float]:
        if self.kind == "concurrency":
            return {"concurrency": int(self.value)}
        return {"rate_requests_per_second": self.value}


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class StepStats:
    """The summary of one step of one target."""

    step: Step
    requests: int
    successful_requests: int
    errors: dict[str, int]
    error_examples: dict[str, str]
    wall_seconds: float
    requests_per_second: float
    output_tokens_per_second: float
    output_tokens: int
    prompt_tokens: int | None
    ttft_seconds: Percentiles | None
    itl_seconds: Percentiles | None
    tpot_seconds: Percentiles | None
    e2e_seconds: Percentiles | None

    @property
    def failed_requests(self) -> int:
        return self.requests - self.successful_requests

    @property
    def error_rate(self) -> float:
        return self.failed_requests / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        def maybe(p: Percentiles | None) -> dict[str, float] | None:
            return None if p is None else p.to_json()

        return {
            **self.step.to_json(),
            "requests": self.requests,
            "successful_requests": self.successful_requests,
            "failed_requests": self.failed_requests,
            "error_rate": self.error_rate,
            "errors": dict(self.errors),
            "error_examples": dict(self.error_examples),
            "wall_seconds": self.wall_seconds,
            "requests_per_second": self.requests_per_second,
            "output_tokens_per_second": self.output_tokens_per_second,
            "output_tokens_total": self.output_tokens,
            "prompt_tokens_total": self.prompt_tokens,
            "ttft_seconds": maybe(self.ttft_seconds),
            "itl_seconds": maybe(self.itl_seconds),
            "tpot_seconds": maybe(self.tpot_seconds),
            "e2e_seconds": maybe(self.e2e_seconds),
        }


def summarize(step: Step, records: Sequence[RequestRecord]) -> StepStats:
    """One step's numbers from its requests (see the module docstring for the definitions)."""
    ok = [r for r in records if r.ok]
    wall_seconds = max((r.finish_seconds for r in records), default=0.0) - min(
        (r.send_seconds for r in records), default=0.0
    )
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok]
    errors = Counter(r.error_kind for r in records if r.error_kind is not None)
    examples: dict[str, str] = {}
    for r in records:
        if r.error_kind is not None:
            examples.setdefault(r.error_kind, r.error_message or "")
    return StepStats(
        step=step,
        requests=len(records),
        successful_requests=len(ok),
        errors=dict(sorted(errors.items())),
        error_examples=dict(sorted(examples.items())),
        wall_seconds=wall_seconds,
        requests_per_second=len(ok) / wall_seconds if wall_seconds > 0 else 0.0,
        output_tokens_per_second=output_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        output_tokens=output_tokens,
        prompt_tokens=None if not ok or None in prompt_counts else sum(c for c in prompt_counts if c is not None),
        ttft_seconds=Percentiles.of([t for r in ok if (t := r.ttft_seconds) is not None]),
        itl_seconds=Percentiles.of([gap for r in ok for gap in r.itl_seconds]),
        tpot_seconds=Percentiles.of([t for r in ok if (t := r.tpot_seconds) is not None]),
        e2e_seconds=Percentiles.of([r.e2e_seconds for r in ok]),
    )


@dataclass(frozen=True)
class Saturation:
    """Where a target stopped scaling, and the numbers that show it."""

    step: Step
    previous: Step | None
    reason: Literal["throughput", "errors"]
    throughput_gain: float | None
    """Relative to the previous step: 0.04 is +4%."""
    ttft_p50_ratio: float | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            **self.step.to_json(),
            "previous": None if self.previous is None else self.previous.to_json(),
            "reason": self.reason,
            "throughput_gain": self.throughput_gain,
            "ttft_p50_ratio": self.ttft_p50_ratio,
            "message": self.message,
        }


def find_saturation(steps: Sequence[StepStats]) -> Saturation | None:
    """The first step with errors, or with throughput +<10% while TTFT p50 ×≥2 over the step before; else None."""
    for index, stats in enumerate(steps):
        previous = steps[index - 1] if index else None
        gain, ratio = _growth(previous, stats)
        if stats.failed_requests:
            failed = ", ".join(f"{kind} ×{count}" for kind, count in stats.errors.items())
            message = (
                f"saturates at {stats.step.label()}: {stats.failed_requests} of {stats.requests} "
                f"requests failed ({failed})"
            )
            return Saturation(stats.step, None if previous is None else previous.step, "errors", gain, ratio, message)
        if (
            previous is not None
            and gain is not None
            and ratio is not None
            and gain < MIN_THROUGHPUT_GAIN
            and ratio >= TTFT_GROWTH
        ):
            message = (
                f"saturates at {stats.step.label()}: throughput {gain:+.0%} over {previous.step.short()} "
                f"while TTFT p50 ×{ratio:.1f}"
            )
            return Saturation(stats.step, previous.step, "throughput", gain, ratio, message)
    return None


def _growth(previous: StepStats | None, stats: StepStats) -> tuple[float | None, float | None]:
    """(throughput gain, TTFT p50 ratio) over the previous step; None where it cannot be computed."""
    if previous is None:
        return None, None
    gain = None
    if previous.output_tokens_per_second > 0:
        gain = stats.output_tokens_per_second / previous.output_tokens_per_second - 1
    ratio = None
    if previous.ttft_seconds is not None and stats.ttft_seconds is not None and previous.ttft_seconds.p50 > 0:
        ratio = stats.ttft_seconds.p50 / previous.ttft_seconds.p50
    return gain, ratio


def saturation_line(steps: Sequence[StepStats], saturation: Saturation | None) -> str:
    """The saturation in plain words, or how far it scaled without saturating."""
    if saturation is not None:
        return saturation.message
    if not steps:
        return "no steps ran"
    return f"no saturation up to {steps[-1].step.label()}"
