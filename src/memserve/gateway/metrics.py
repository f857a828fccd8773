"""``GET /metrics``: request tallies kept on the request path, everything else read at scrape time.

Three parts, as docs/metrics.md designs them:

- :class:`RequestMetrics` counts each generation request when it finishes (``RequestRecord.finish``), in
  plain dicts and :class:`~memserve.tally.Tally` lists owned by the gateway's loop: no lock and no
  prometheus-client object on the request path. Labels are bounded here: a model the configuration does not
  name is ``(other)``, an error code memserve does not declare is ``upstream_other``, and the end user is
  never a label.
- :func:`take_snapshot` copies, on the loop and with no ``await``, the request tallies, the pool's lifecycle
  counters (``pool/counters.py``), the ledger, each model's entry and the figures its runner last pushed:
  one consistent instant, taken without talking to any runner, so a loading runner never holds a scrape.
- :func:`render` turns a snapshot into the text format with prometheus-client, in a thread (rendering a
  big snapshot takes tens of milliseconds, which on the loop would stall every stream).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from memserve import __version__, errors
from memserve.config import Settings
from memserve.pool.counters import HISTOGRAMS as POOL_HISTOGRAMS
from memserve.pool.state import ModelState
from memserve.tally import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Family,
    Labels,
    Tally,
    Values,
    increment,
    observe,
)

if TYPE_CHECKING:
    from memserve.gateway.metering import RequestRecord
    from memserve.pool.pool import ModelPool

OTHER_MODEL = "(other)"
"""The ``model`` label of a request for a name the configuration does not list (bounded labels only)."""
OTHER_CODE = "upstream_other"
"""The ``code`` label of an error code that memserve does not declare (a provider's own)."""
MODEL_PROVIDER = ("model", "provider")

REQUESTS = Family(
    "memserve_requests",
    "counter",
    "Generation requests by outcome, one per request whatever became of it.",
    ("model", "provider", "status_class", "code", "key"),
)
PROMPT_TOKENS = Family(
    "memserve_prompt_tokens", "counter", "Prompt tokens of finished requests.", ("model", "provider", "key")
)
GENERATION_TOKENS = Family(
    "memserve_generation_tokens",
    "counter",
    "Completion tokens of finished requests; a stream cut short counts the text events sent.",
    ("model", "provider", "key"),
)
FALLBACKS = Family(
    "memserve_fallbacks",
    "counter",
    "Requests for a local model sent to its fallback provider, by the error code that caused it.",
    ("model", "provider", "code"),
)
TTFT = Family(
    "memserve_time_to_first_token_seconds",
    "histogram",
    "Seconds from the request's arrival at the gateway to the first byte of a streamed answer (a cold load included).",
    MODEL_PROVIDER,
    TTFT_BUCKETS,
)
ITL = Family(
    "memserve_inter_token_latency_seconds",
    "histogram",
    "Seconds between text events of a stream as the gateway relays them.",
    MODEL_PROVIDER,
    ITL_BUCKETS,
)
TPOT = Family(
    "memserve_request_time_per_output_token_seconds",
    "histogram",
    "Per stream: (last text - first text) / (completion tokens - 1).",
    MODEL_PROVIDER,
    ITL_BUCKETS,
)
E2E = Family(
    "memserve_e2e_request_latency_seconds",
    "histogram",
    "Seconds from arrival to the answer's end, for 2xx answers (a stream the client left included).",
    MODEL_PROVIDER,
    REQUEST_LATENCY_BUCKETS,
)
QUEUE = Family(
    "memserve_request_queue_time_seconds",
    "histogram",
    "Seconds a request for a local model waited for a lease: its load, memory to free, a draining runner.",
    ("model",),
    REQUEST_LATENCY_BUCKETS,
)
PROMPT_HISTOGRAM = Family(
    "memserve_request_prompt_tokens",
    "histogram",
    "Prompt tokens per finished request.",
    MODEL_PROVIDER,
    TOKEN_BUCKETS,
)
GENERATION_HISTOGRAM = Family(
    "memserve_request_generation_tokens",
    "histogram",
    "Completion tokens per finished request.",
    MODEL_PROVIDER,
    TOKEN_BUCKETS,
)
IN_FLIGHT = Family(
    "memserve_requests_in_flight", "gauge", "Generation requests the gateway is answering now.", MODEL_PROVIDER
)
REQUEST_COUNTERS = (REQUESTS, PROMPT_TOKENS, GENERATION_TOKENS, FALLBACKS)
REQUEST_HISTOGRAMS = (TTFT, ITL, TPOT, E2E, QUEUE, PROMPT_HISTOGRAM, GENERATION_HISTOGRAM)


def declared_codes() -> frozenset[str]:
    """Every error ``code`` memserve declares (its ``MemserveError`` classes', and the few given per instance),
    plus the gateway's own ``client_closed`` and ``stream_error``: the values the ``code`` label may take."""
    codes, classes = set(), [errors.MemserveError]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if isinstance(cls.code, str):
            codes.add(cls.code)
    instance_codes = {"engine_closed", "engine_failed", "packed_forward_failed"}  # GenerationFailed(code=...)
    return frozenset(codes | instance_codes | {"client_closed", "stream_error"})


class RequestMetrics:
    """The request part of ``/metrics`` (docs/metrics.md §1a), touched only on the gateway's loop."""

    def __init__(self, settings: Settings) -> None:
        local = [m.name for m in settings.models]
        self.models = frozenset(local + [f"{p.name}/{m}" for p in settings.providers for m in p.models])
        self.codes = declared_codes()
        self.counts: dict[Family, dict[Labels, float]] = {family: {} for family in REQUEST_COUNTERS}
        self.tallies: dict[Family, dict[Labels, Tally]] = {family: {} for family in REQUEST_HISTOGRAMS}
        self.in_flight: dict[Labels, float] = {}

    def model_label(self, model: str | None) -> str:
        return model if model is not None and model in self.models else OTHER_MODEL

    def code_label(self, code: str | None) -> str:
        if not code:
            return ""
        return code if code in self.codes else OTHER_CODE

    def begin(self, record: RequestRecord) -> None:
        """The request now counts as in flight for its model and provider (again under the new ones, when a
        fallback sends it elsewhere)."""
        self._leave(record)
        labels = (self.model_label(record.model), record.provider)
        record.in_flight = labels
        self.in_flight[labels] = self.in_flight.get(labels, 0) + 1

    def request_done(
        self,
        record: RequestRecord,
        *,
        status: int,
        code: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_seconds: float | None,
        duration_seconds: float,
    ) -> None:
        """Count one finished request (``RequestRecord.finish``, once, however it ended)."""
        self._leave(record)
        model, provider = self.model_label(record.model), record.provider
        key = (record.caller.name or "") if record.caller is not None else ""
        pair = (model, provider)
        increment(self.counts[REQUESTS], (model, provider, f"{status // 100}xx", self.code_label(code), key))
        increment(self.counts[PROMPT_TOKENS], (model, provider, key), prompt_tokens)
        increment(self.counts[GENERATION_TOKENS], (model, provider, key), completion_tokens)
        if record.fallback_code is not None:
            increment(self.counts[FALLBACKS], (model, provider, self.code_label(record.fallback_code)))
        if record.queue_seconds is not None:
            observe(self.tallies[QUEUE], (model,), REQUEST_LATENCY_BUCKETS, record.queue_seconds)
        if record.status is None or not 200 <= record.status < 300:
            return  # latencies and sizes describe answers, not refusals
        observe(self.tallies[E2E], pair, REQUEST_LATENCY_BUCKETS, duration_seconds)
        observe(self.tallies[PROMPT_HISTOGRAM], pair, TOKEN_BUCKETS, prompt_tokens)
        observe(self.tallies[GENERATION_HISTOGRAM], pair, TOKEN_BUCKETS, completion_tokens)
        if ttft_seconds is not None:
            observe(self.tallies[TTFT], pair, TTFT_BUCKETS, ttft_seconds)
        if record.gaps is not None:
            tally = self.tallies[ITL].get(pair)
            if tally is None:
                tally = self.tallies[ITL][pair] = Tally(ITL_BUCKETS)
            tally.add(record.gaps)
        if record.first_text is not None and record.last_text is not None and completion_tokens > 1:
            per_token = (record.last_text - record.first_text) / (completion_tokens - 1)
            observe(self.tallies[TPOT], pair, ITL_BUCKETS, per_token)

    def snapshot(self) -> list[tuple[Family, Values]]:
        families: list[tuple[Family, Values]] = [(family, dict(values)) for family, values in self.counts.items()]
        families += [
            (family, {labels: tally.copy() for labels, tally in tallies.items()})
            for family, tallies in self.tallies.items()
        ]
        families.append((IN_FLIGHT, dict(self.in_flight)))
        return families

    def _leave(self, record: RequestRecord) -> None:
        if record.in_flight is not None:
            left = self.in_flight[record.in_flight] - 1
            if left:
                self.in_flight[record.in_flight] = left
            else:
                del self.in_flight[record.in_flight]  # a label set no request uses is not kept at 0 forever
            record.in_flight = None


# ----------------------------------------------------------------------------------------------- scrape time

BUILD_INFO = Family("memserve_build_info", "gauge", "1, labelled with memserve's version.", ("version",))
DEVICE_FAMILIES = {
    "capacity_bytes": Family(
        "memserve_device_capacity_bytes",
        "gauge",
        "Most memserve may use on the device: its budget, or free memory at start.",
        ("device",),
    ),
    "headroom_bytes": Family(
        "memserve_device_headroom_bytes", "gauge", "Bytes of the capacity never handed out.", ("device",)
    ),
    "usable_bytes": Family("memserve_device_usable_bytes", "gauge", "Capacity less headroom.", ("device",)),
    "held_bytes": Family(
        "memserve_device_held_bytes",
        "gauge",
        "Sum over models of max(reserved, measured); above usable when a runner outgrew its plan.",
        ("device",),
    ),
    "free_bytes": Family(
        "memserve_device_free_bytes",
        "gauge",
        "Usable less held, never below 0: what a new load may take now.",
        ("device",),
    ),
}
HOST_AVAILABLE = Family(
    "memserve_host_available_bytes",
    "gauge",
    "Memory available to memserve as the watchdog last saw it (the host's, or room under its cgroup's limit).",
)
MODEL_BYTES = {
    "reserved_bytes": Family(
        "memserve_model_reserved_bytes",
        "gauge",
        "What the model's plan (or calibration) reserves; absent when it holds nothing.",
        ("model", "device"),
    ),
    "measured_bytes": Family(
        "memserve_model_measured_bytes",
        "gauge",
        "The runner's latest memory sample; absent before the first.",
        ("model", "device"),
    ),
    "held_bytes": Family(
        "memserve_model_held_bytes",
        "gauge",
        "max(reserved, measured): what admission counts.",
        ("model", "device"),
    ),
}
MODEL_STATE = Family(
    "memserve_model_state", "gauge", "1 for the model's current state, 0 for the others.", ("model", "state")
)
PLAN_INFO = Family(
    "memserve_model_plan_info",
    "gauge",
    "1 while a plan is loaded, labelled with it.",
    ("model", "rung", "dtype", "quantization", "engine"),
)
CONTEXT = Family("memserve_model_context_tokens", "gauge", "The loaded plan's context length.", ("model",))
CONCURRENCY = Family("memserve_model_concurrency", "gauge", "Sequences the loaded plan generates at once.", ("model",))
LEASES = Family("memserve_model_leases", "gauge", "Requests holding the runner now.", ("model",))
QUEUED = Family(
    "memserve_model_queued_requests", "gauge", "Requests waiting for the model (its load, memory).", ("model",)
)
FAILURES = Family(
    "memserve_model_consecutive_failures", "gauge", "Failures in a row (they drive the restart backoff).", ("model",)
)
EXPIRY = Family(
    "memserve_model_expiry_timestamp_seconds",
    "gauge",
    "When the idle model will be unloaded (Unix time); absent while busy, pinned or kept forever.",
    ("model",),
)
RUNNING = Family("memserve_num_requests_running", "gauge", "Sequences in the runner's engine batch.", ("model",))
WAITING = Family(
    "memserve_num_requests_waiting", "gauge", "Sequences waiting in the runner's engine queue.", ("model",)
)
KV_USAGE = Family(
    "memserve_kv_cache_usage_ratio",
    "gauge",
    "KV pages in use / pages allocated (0..1); continuous-batching engine only.",
    ("model",),
)
KV_BLOCKS = Family("memserve_kv_cache_blocks", "gauge", "KV pages allocated.", ("model",))
STATS_AGE = Family(
    "memserve_runner_stats_age_seconds", "gauge", "Seconds since the runner last reported its figures.", ("model",)
)

Snapshot = list[tuple[Family, Values]]


def take_snapshot(pool: ModelPool, requests: RequestMetrics | None) -> Snapshot:
    """Everything ``/metrics`` shows, copied on the loop in one step (no ``await``): a consistent instant.

    The ledger holds reservations exactly for the models whose runner is up (``_stop`` releases them and
    sets the final state in one step), so no stopped model is shown as holding memory, and no gauge is
    negative (the ledger refuses negative sizes and clamps free at 0). No runner is asked anything.
    """
    build: dict[Labels, float] = {(__version__,): 1}
    snapshot: Snapshot = [(BUILD_INFO, build)]
    memory = pool.ledger.to_json()
    for key, family in DEVICE_FAMILIES.items():
        devices: dict[Labels, float] = {(device,): figures[key] for device, figures in memory["devices"].items()}
        snapshot.append((family, devices))
    available = pool.host_available_bytes
    host: dict[Labels, float] = {(): available} if available is not None else {}
    snapshot.append((HOST_AVAILABLE, host))
    for key, family in MODEL_BYTES.items():
        models: dict[Labels, float] = {
            (model, device): figures[key]
            for model, per_device in memory["models"].items()
            for device, figures in per_device.items()
            if figures[key] is not None
        }
        snapshot.append((family, models))
    states: dict[Labels, float] = {}
    plans: dict[Labels, float] = {}
    per_model: dict[Family, dict[Labels, float]] = {
        f: {} for f in (CONTEXT, CONCURRENCY, LEASES, QUEUED, FAILURES, EXPIRY, RUNNING, WAITING, KV_USAGE)
    }
    per_model.update({KV_BLOCKS: {}, STATS_AGE: {}})
    now = time.monotonic()
    for entry in pool.entries.values():
        name = entry.name
        for state in ModelState:
            states[(name, str(state))] = 1 if entry.state == state else 0
        per_model[LEASES][(name,)] = entry.leases
        per_model[QUEUED][(name,)] = entry.waiting
        per_model[FAILURES][(name,)] = entry.failures
        runner, plan = entry.runner, entry.plan
        if runner is not None and plan is not None:
            plans[(name, plan.rung, plan.dtype, plan.quantization, plan.engine)] = 1
            per_model[CONTEXT][(name,)] = plan.context_tokens
            per_model[CONCURRENCY][(name,)] = plan.concurrency
        expires = pool.row(entry)["expires_at"] if entry.expires_at is not None else None
        if expires is not None:
            per_model[EXPIRY][(name,)] = expires
        pushed = runner.last_stats if runner is not None and entry.state == ModelState.READY else None
        if pushed is not None:
            stats, at = pushed
            per_model[RUNNING][(name,)] = stats.running
            per_model[WAITING][(name,)] = stats.waiting
            per_model[STATS_AGE][(name,)] = max(0.0, now - at)
            if stats.kv_cache_blocks:
                per_model[KV_BLOCKS][(name,)] = stats.kv_cache_blocks
                if stats.kv_cache_blocks_used is not None:
                    per_model[KV_USAGE][(name,)] = stats.kv_cache_blocks_used / stats.kv_cache_blocks
    snapshot += [(MODEL_STATE, states), (PLAN_INFO, plans), *per_model.items()]
    snapshot += pool.counters.snapshot()
    if requests is not None:
        snapshot += requests.snapshot()
    return snapshot


class SnapshotCollector(Collector):
    """Yields a snapshot's families as prometheus-client metric families; reads nothing else, so it may run in
    any thread."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for family, values in self.snapshot:
            yield _metric(family, values)


def _metric(family: Family, values: Values) -> Metric:
    labels = list(family.labels)
    if family.kind == "histogram":
        histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
        for key, tally in sorted(values.items()):
            assert isinstance(tally, Tally)
            histogram.add_metric(list(key), [(le, float(n)) for le, n in tally.cumulative()], tally.sum)
        return histogram
    metric: CounterMetricFamily | GaugeMetricFamily = (
        CounterMetricFamily(family.name, family.help, labels=labels)
        if family.kind == "counter"
        else GaugeMetricFamily(family.name, family.help, labels=labels)
    )
    for key, value in sorted(values.items()):
        assert isinstance(value, int | float)
        metric.add_metric(list(key), float(value))
    return metric


def render(snapshot: Snapshot, *, process: bool = True) -> bytes:
    """The text format of ``snapshot`` (and the gateway's own ``process_*`` series): run it in a thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    if process:
        ProcessCollector(registry=registry)
    return generate_latest(registry)


def all_families() -> list[Family]:
    """Every family ``/metrics`` may show (for the docs and the bounded-labels test)."""
    from memserve.pool.counters import COUNTERS, LAST_ESTIMATE_RATIO

    scrape = [
        BUILD_INFO,
        *DEVICE_FAMILIES.values(),
        HOST_AVAILABLE,
        *MODEL_BYTES.values(),
        MODEL_STATE,
        PLAN_INFO,
        CONTEXT,
        CONCURRENCY,
        LEASES,
        QUEUED,
        FAILURES,
        EXPIRY,
        RUNNING,
        WAITING,
        KV_USAGE,
        KV_BLOCKS,
        STATS_AGE,
    ]
    return [
        *REQUEST_COUNTERS,
        *REQUEST_HISTOGRAMS,
        IN_FLIGHT,
        *scrape,
        *COUNTERS,
        *POOL_HISTOGRAMS,
        LAST_ESTIMATE_RATIO,
    ]


__all__ = [
    "CONTENT_TYPE_LATEST",
    "OTHER_CODE",
    "OTHER_MODEL",
    "RequestMetrics",
    "SnapshotCollector",
    "all_families",
    "declared_codes",
    "render",
    "take_snapshot",
]
