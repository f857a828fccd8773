"""One benchmark run: warm up each target, measure the client's own overhead, then run the steps.

With two targets (``--vs``) the steps alternate, A@1, B@1, A@2, B@2, ..., so both see the same
machine state and their ratios come from one run. The report is handed to ``save`` after every step
(and once more at the end, also after a failure or Ctrl-C), so partial results are never lost.

A warm-up request that fails is fatal, with a one-line ``MemserveError`` saying what the server did
and what to try; failures during the steps are results (they mark saturation). A target whose step
had no successful request runs no further steps.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from memserve.bench.load import Clock, LoadGenerator, Sleep, Target, list_models, make_client
from memserve.bench.prompts import PromptSource
from memserve.bench.stats import (
    Percentiles,
    RequestRecord,
    Saturation,
    Step,
    StepStats,
    find_saturation,
    saturation_line,
    summarize,
)
from memserve.errors import BadUpstream, InvalidArgument, MemserveError, ModelNotFound, UpstreamUnavailable

__all__ = [
    "BenchConfig",
    "BenchReport",
    "ClientOverhead",
    "Reporter",
    "TargetResult",
    "default_requests",
    "measure_client_overhead",
    "run_bench",
]

SCHEMA = "memserve.bench/1"
OVERHEAD_RATE_CONCURRENCY = 16
"""The concurrency of the overhead measurement in rate mode without ``--max-concurrency``."""


def default_requests(step: Step) -> int:
    """Requests per step when neither ``--requests`` nor ``--duration`` is given: max(16, 4 × concurrency)."""
    return max(16, math.ceil(4 * step.value))


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs besides its prompts; ``command`` is the command line, for the report."""

    targets: tuple[Target, ...]
    steps: tuple[Step, ...]
    requests_per_step: int | None = None
    duration_seconds: float | None = None
    timeout_seconds: float = 300.0
    warmup_requests: int = 0
    """Extra warm-up requests per target, on top of the first one."""
    seed: int = 0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    measure_overhead: bool = True
    command: str = ""

    def max_requests(self, step: Step) -> int | None:
        """The count limit of a step: ``--requests``, none when only ``--duration`` is given, else the default."""
        if self.requests_per_step is not None:
            return self.requests_per_step
        return None if self.duration_seconds is not None else default_requests(step)

    def overhead_concurrency(self) -> int:
        if self.steps and self.steps[0].kind == "concurrency":
            return int(max(step.value for step in self.steps))
        return self.max_concurrency or OVERHEAD_RATE_CONCURRENCY

    def to_json(self) -> dict[str, Any]:
        kind = self.steps[0].kind if self.steps else "concurrency"
        return {
            "mode": "closed_loop" if kind == "concurrency" else "open_loop_poisson",
            "steps": [step.to_json() for step in self.steps],
            "requests_per_step": self.requests_per_step,
            "requests_per_step_default": "max(16, 4 × step)"
            if self.requests_per_step is None and self.duration_seconds is None
            else None,
            "duration_seconds_per_step": self.duration_seconds,
            "timeout_seconds": self.timeout_seconds,
            "warmup_requests": 1 + self.warmup_requests,
            "seed": self.seed,
            "max_concurrency": self.max_concurrency,
            "ignore_eos": self.ignore_eos,
        }


class Reporter(Protocol):
    """What the live view sees while the run goes on."""

    def step_started(self, target: Target, step: Step, max_requests: int | None) -> None: ...

    def request_done(self, target: Target, record: RequestRecord) -> None: ...

    def step_finished(self, target: Target, stats: StepStats) -> None: ...

    def note(self, message: str) -> None: ...


class SilentReporter:
    def step_started(self, target: Target, step: Step, max_requests: int | None) -> None:
        pass

    def request_done(self, target: Target, record: RequestRecord) -> None:
        pass

    def step_finished(self, target: Target, stats: StepStats) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class TargetResult:
    """The steps one target ran, and why it stopped early (if it did)."""

    target: Target
    steps: list[StepStats] = field(default_factory=list)
    stopped: str | None = None

    @property
    def saturation(self) -> Saturation | None:
        return find_saturation(self.steps)

    def saturation_line(self) -> str:
        return f"{self.target.name}: {saturation_line(self.steps, self.saturation)}"

    def to_json(self) -> dict[str, Any]:
        saturation = self.saturation
        return {
            **self.target.to_json(),
            "steps": [s.to_json() for s in self.steps],
            "saturation": None if saturation is None else saturation.to_json(),
            "saturation_summary": saturation_line(self.steps, saturation),
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class ClientOverhead:
    """The client against an instant fake on 127.0.0.1: its latency floor and the most tokens/s it parses."""

    stats: StepStats

    def to_json(self) -> dict[str, Any]:
        def maybe(p: Percentiles | None) -> dict[str, float] | None:
            return None if p is None else p.to_json()

        s = self.stats
        return {
            **s.step.to_json(),
            "requests": s.requests,
            "failed_requests": s.failed_requests,
            "latency_floor_seconds": maybe(s.e2e_seconds),
            "ttft_floor_seconds": maybe(s.ttft_seconds),
            "itl_floor_seconds": maybe(s.itl_seconds),
            "max_output_tokens_per_second": s.output_tokens_per_second,
            "max_requests_per_second": s.requests_per_second,
        }

    def line(self) -> str:
        """``client overhead (instant fake on 127.0.0.1, 16 concurrent): latency floor p50 2.1 ms ...``."""
        s = self.stats
        floor = (
            "-"
            if s.e2e_seconds is None
            else f"p50 {s.e2e_seconds.p50 * 1e3:.1f} ms, p99 {s.e2e_seconds.p99 * 1e3:.1f} ms"
        )
        return (
            f"client overhead (instant fake on 127.0.0.1, {s.step.label()}): latency floor {floor}; "
            f"parses up to {s.output_tokens_per_second:,.0f} output tok/s"
        )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


@dataclass
class BenchReport:
    """The whole run as the JSON file writes it; valid at every point, so it can be saved after each step."""

    config: BenchConfig
    prompts: dict[str, Any]
    results: list[TargetResult]
    started_at: str = field(default_factory=_now_iso)
    finished_at: str | None = None
    overhead: ClientOverhead | None = None
    order: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def comparison(self) -> list[dict[str, Any]]:
        """B ÷ A per step both ran (>1 means B is higher: better for tokens/s, worse for latencies)."""
        if len(self.results) != 2:
            return []
        a, b = self.results
        return [{**sa.step.to_json(), **_ratios(sa, sb)} for sa, sb in zip(a.steps, b.steps, strict=False)]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "command": self.config.command,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "machine": machine(),
            "settings": self.config.to_json(),
            "prompts": self.prompts,
            "client_overhead": None if self.overhead is None else self.overhead.to_json(),
            "targets": [r.to_json() for r in self.results],
            "order": self.order,
            "comparison": {"ratio": "B/A", "steps": self.comparison()} if len(self.results) == 2 else None,
            "error": self.error,
        }


def _p50(p: Percentiles | None) -> float | None:
    return None if p is None else p.p50


def ratio(b: float | None, a: float | None) -> float | None:
    """b ÷ a, or None when either is unknown or a is zero."""
    return None if a is None or b is None or a == 0 else b / a


def _ratios(a: StepStats, b: StepStats) -> dict[str, float | None]:
    return {
        "output_tokens_per_second": ratio(b.output_tokens_per_second, a.output_tokens_per_second),
        "requests_per_second": ratio(b.requests_per_second, a.requests_per_second),
        "ttft_p50": ratio(_p50(b.ttft_seconds), _p50(a.ttft_seconds)),
        "tpot_p50": ratio(_p50(b.tpot_seconds), _p50(a.tpot_seconds)),
        "e2e_p50": ratio(_p50(b.e2e_seconds), _p50(a.e2e_seconds)),
    }


async def run_bench(
    config: BenchConfig,
    prompts: PromptSource,
    *,
    clock: Clock = time.perf_counter,
    sleep: Sleep = asyncio.sleep,
    transport: httpx.AsyncBaseTransport | None = None,
    reporter: Reporter | None = None,
    save: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Run the benchmark; raises a ``MemserveError`` after saving the partial report when a warm-up fails."""
    report = BenchReport(config, prompts.describe(), [TargetResult(t) for t in config.targets])
    reporter = reporter or SilentReporter()
    save = save or (lambda _: None)
    clients = {
        t.name: make_client(t, timeout_seconds=config.timeout_seconds, transport=transport) for t in config.targets
    }
    run = _Run(config, prompts, clock, sleep, reporter)
    try:
        for target in config.targets:
            await run.warm_up(clients[target.name], target)
        if config.measure_overhead:
            report.overhead = await measure_client_overhead(config, prompts)
            reporter.note(report.overhead.line())
        save(report)
        for index, step in enumerate(config.steps):
            for result in report.results:
                if result.stopped is None:
                    await run.step(clients[result.target.name], result, index, step, report)
                    save(report)
    except MemserveError as exc:
        report.error = exc.message
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        report.error = "interrupted before the end (Ctrl-C): the steps so far are complete, the rest did not run"
        raise
    finally:
        report.finished_at = _now_iso()
        await asyncio.gather(*(client.aclose() for client in clients.values()))
        save(report)
    return report


@dataclass
class _Run:
    config: BenchConfig
    prompts: PromptSource
    clock: Clock
    sleep: Sleep
    reporter: Reporter

    def generator(self, client: httpx.AsyncClient, target: Target) -> LoadGenerator:
        return LoadGenerator(
            client,
            target,
            clock=self.clock,
            sleep=self.sleep,
            timeout_seconds=self.config.timeout_seconds,
            ignore_eos=self.config.ignore_eos,
            on_record=functools.partial(self.reporter.request_done, target),
        )

    async def warm_up(self, client: httpx.AsyncClient, target: Target) -> None:
        """One request that must succeed (else a clear error), then ``--warmup`` more; none of them counted."""
        generator = self.generator(client, target)
        first = await generator.one(self.prompts.prompt(-1, 0))
        if not first.ok:
            raise await explain_failure(client, target, first)
        extra = self.config.warmup_requests
        if extra:
            await generator.closed_loop(
                lambda i: self.prompts.prompt(-1, i + 1), concurrency=extra, max_requests=extra, duration_seconds=None
            )
        self.reporter.note(f"{target.describe()}: warmed up with {1 + extra} request{'s' if extra else ''}")

    async def step(
        self, client: httpx.AsyncClient, result: TargetResult, index: int, step: Step, report: BenchReport
    ) -> None:
        target, config = result.target, self.config
        max_requests = config.max_requests(step)
        started_at = _now_iso()
        self.reporter.step_started(target, step, max_requests)
        generator = self.generator(client, target)
        prompt_at = functools.partial(self.prompts.prompt, index)
        if step.kind == "concurrency":
            records = await generator.closed_loop(
                prompt_at,
                concurrency=int(step.value),
                max_requests=max_requests,
                duration_seconds=config.duration_seconds,
            )
        else:
            records = await generator.open_loop(
                prompt_at,
                rate_per_second=step.value,
                max_requests=max_requests,
                duration_seconds=config.duration_seconds,
                seed=config.seed + index,
                max_concurrency=config.max_concurrency,
            )
        stats = summarize(step, records)
        result.steps.append(stats)
        report.order.append(
            {"target": target.name, **step.to_json(), "started_at": started_at, "finished_at": _now_iso()}
        )
        self.reporter.step_finished(target, stats)
        if stats.requests and not stats.successful_requests:
            kinds = ", ".join(f"{kind} ×{count}" for kind, count in stats.errors.items())
            result.stopped = f"every request at {step.label()} failed ({kinds}); no further steps for {target.name}"
            self.reporter.note(result.stopped)


async def explain_failure(client: httpx.AsyncClient, target: Target, record: RequestRecord) -> MemserveError:
    """The one-line error for a failed warm-up request: what the server did, and what to try."""
    kind, what = record.error_kind or "", record.error_message or "no reason recorded"
    where = f"warm-up request to {target.base_url} (model {target.model!r}) failed"
    if kind == "http_404":
        models = await list_models(client, target)
        if models is None:
            return ModelNotFound(
                f"{where}: {what}; GET {target.base_url}/models did not answer a model list "
                "either: is this an OpenAI-compatible server? check the URL"
            )
        if target.model not in models:
            served = ", ".join(models) or "no models"
            return ModelNotFound(
                f"{where}: the server does not know model {target.model!r} ({what}); "
                f"it serves: {served}; pass one of them with --model"
            )
        return ModelNotFound(f"{where}: {what}; the model is listed but {target.path} is not found: check the URL")
    if kind in ("http_401", "http_403"):
        return InvalidArgument(f"{where}: {what}; pass the API key's environment variable with --api-key-env")
    if kind.startswith("http_4"):
        return InvalidArgument(f"{where}: the server refused the request: {what}")
    if kind.startswith("http_5") or kind == "stream_error":
        return BadUpstream(f"{where}: the server failed: {what}; check the server's logs")
    if kind == "bad_stream":
        return BadUpstream(f"{where}: {what}; is this an OpenAI-compatible server that streams?")
    if kind == "connect":
        return UpstreamUnavailable(f"{where}: {what}; is the server running? check the URL and port")
    if kind == "timeout":
        return UpstreamUnavailable(f"{where}: {what}; the server is not answering: raise --timeout or check it")
    return UpstreamUnavailable(f"{where}: {what}")


async def measure_client_overhead(config: BenchConfig, prompts: PromptSource) -> ClientOverhead:
    """The load at the top concurrency against an instant fake on 127.0.0.1 streaming the same token counts."""
    from memserve.wire.fake import FakeOpenAI, serve_in_thread  # here: its answer shapes cost every CLI an import

    concurrency = config.overhead_concurrency()
    step = Step("concurrency", concurrency)
    fake = FakeOpenAI(models=("client-overhead",))
    with serve_in_thread(
        fake,
        hint="it is the fake server of the client-overhead measurement: pass --no-overhead to skip that measurement",
    ) as origin:
        target = Target("overhead", f"{origin}/v1", "client-overhead", endpoint=config.targets[0].endpoint)
        async with make_client(target, timeout_seconds=config.timeout_seconds) as client:
            generator = LoadGenerator(client, target, timeout_seconds=config.timeout_seconds)
            await generator.one(prompts.prompt(-1, 0))
            records = await generator.closed_loop(
                functools.partial(prompts.prompt, -2),
                concurrency=concurrency,
                max_requests=default_requests(step),
                duration_seconds=None,
            )
    return ClientOverhead(summarize(step, records))
