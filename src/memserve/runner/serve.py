"""Run one runner: load by plan, build the engine, serve the OpenAI-compatible app on a socket or port."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument
from memserve.memory.estimate import GENERATE, IMAGE_TEXT
from memserve.memory.fit import PlanFile
from memserve.runner.load import (
    WORST_CASE_PHASE,
    LoadReport,
    load_model,
    peak_rss_bytes,
    process_memory,
    record_phase,
    reset_peak_rss,
)
from memserve.runner.progress import LoadProgress, emit
from memserve.runner.threads import on_fresh_thread
from memserve.wire.events import EngineFallback, EngineStats, Listening, Ready, Stats, TestBalloon

# the plan names the engine (a model's `engine:`, `memserve fit --engine`); this overrides it, to compare the two
# on one plan (a plan priced for the other engine may then be over or under what it really needs)
ENGINE_ENV = "MEMSERVE_ENGINE"
GRACEFUL_SHUTDOWN_SECONDS = 10  # then streams still open are cancelled and the engine closes
TEST_EXTRA_BYTES_ENV = "MEMSERVE_TEST_EXTRA_BYTES"
STATS_SECONDS = 2.0  # how often the engine's figures are looked at, and pushed to the gateway when they changed
STATS_EVERY_SECONDS = 15.0  # pushed at least this often even when unchanged (their age shows the runner alive)
_BALLOON_CHUNK_BYTES = 8 << 20
_balloon: list[bytearray] = []
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
"""oneDNN keeps a primitive (with its JIT code and scratch buffers) per matmul shape, up to 1,024 by
default, and torch's ideep keeps its own cache of as many: every prompt length adds a prefill shape,
MoE adds one per expert token count and eager attention one per decode length, until they hold
hundreds of MiB that no plan can price. 128 of each keep decode's shapes warm. An operator's own
setting wins."""


def _test_balloon(name: str) -> None:
    """Test hook, off unless ``MEMSERVE_TEST_EXTRA_BYTES=NAME=SIZE`` names this runner: while warming up,
    use SIZE more bytes than the plan says, 8 MiB every 10 ms (a load that lies about its memory), so that
    tests can prove the gateway's watchdog stops a runaway load before it crosses the budget."""
    target, _, size = os.environ.get(TEST_EXTRA_BYTES_ENV, "").partition("=")
    if not size or target != name:
        return
    from memserve.units import parse_bytes

    extra = parse_bytes(size, what=TEST_EXTRA_BYTES_ENV)
    emit(TestBalloon(extra))
    while len(_balloon) * _BALLOON_CHUNK_BYTES < extra:
        _balloon.append(bytearray(b"\x01") * _BALLOON_CHUNK_BYTES)  # filled, so every page is really used
        time.sleep(0.01)


def _peaks() -> dict[str, int]:
    """The process's peak per device so far: resident high-water mark on cpu, peak reserved on each GPU."""
    peaks = {"cpu": peak_rss_bytes()}
    for device, memory in process_memory().items():
        if device != "cpu":
            peaks[device] = int(memory.get("peak_reserved_bytes", 0))
    return peaks


def fit_to_reservation(
    engine: Any,
    launch: PlanFile,
    report: LoadReport,
    rebuild: Callable[[int], Any],
    *,
    progress: LoadProgress | None = None,
) -> Any:
    """Run the heaviest work the plan admits, measure the peak, and make what the runner admits fit.

    ``engine.warm_up_worst_case()`` runs one request through the engine's own path with the largest
    prefill chunk the plan admits, every KV page touched where the engine preallocates them. An engine
    that measured fewer sequences than it admits (the ``generate`` fallback grows its cache per call)
    has the rest of the plan's KV cache added to its peak.
    If that exceeds the reservation, the runner admits fewer sequences (``rebuild(n)`` builds the engine
    anew for ``n``; the KV cache is what shrinks), the peak is reset and measured again. If even one
    sequence does not fit, ``plan_check.needs_bytes`` says what it really needs, so that the pool
    reserves that before it sends traffic. Everything is kept in ``report.plan_check`` (/health) and
    reported as the ``worst_case`` phase. The reservation is the pool's when the plan file carries one
    (``PlanFile.reservation_bytes``: a calibrated figure may be above the estimate), else the plan's totals.
    """
    from memserve.runner.kernels import trim_heap

    progress = progress if progress is not None else LoadProgress.for_stderr()
    plan = launch.plan
    planned = plan.concurrency
    kv = {d: need.kv_cache_bytes for d, need in plan.devices.items()}
    reserved = launch.reservation_bytes
    sequences = planned
    tries: list[dict[str, Any]] = []
    started = time.perf_counter()
    report.state = "warming"
    progress.phase_started(WORST_CASE_PHASE)
    while True:
        warm = engine.warm_up_worst_case()
        trim_heap()
        peaks = _peaks()
        unmeasured = (
            {d: (sequences - int(warm["measured_sequences"])) * kv.get(d, 0) // planned for d in reserved}
            if engine.name in (GENERATE, IMAGE_TEXT)
            else {}
        )
        worst = {d: peaks.get(d, 0) + unmeasured.get(d, 0) for d in reserved}
        over = {d: worst[d] - reserved[d] for d in reserved if worst[d] > reserved[d]}
        tries.append({"sequences": sequences, "peak_bytes": worst, "measured_bytes": peaks, **warm})
        per_sequence = {d: kv[d] / planned for d in over if kv.get(d, 0) > 0}
        if not over or sequences == 1 or not per_sequence:
            break
        drop = max(math.ceil(over[d] / per_sequence[d]) for d in per_sequence)
        sequences = max(1, sequences - drop)
        engine = rebuild(sequences)
        reset_peak_rss()
    check: dict[str, Any] = {
        "reserved_bytes": reserved,
        "peak_bytes": worst,
        "fits": not over,
        "planned_sequences": planned,
        "sequences": sequences,
        "max_batch_tokens": plan.max_batch_tokens,
        "prompt_tokens": tries[-1]["prompt_tokens"],
        "tries": tries,
    }
    if over:
        check["needs_bytes"] = {d: max(worst[d], reserved[d]) for d in reserved}
    report.plan_check = check
    report.state = "ready"
    record_phase(
        report,
        progress,
        WORST_CASE_PHASE,
        started,
        fits=not over,
        sequences=sequences,
        planned_sequences=planned,
        peak_bytes=worst,
        reserved_bytes=reserved,
        **({"needs_bytes": check["needs_bytes"]} if over else {}),
    )
    return engine


def report_stats(
    stats: Callable[[], EngineStats],
    stop: threading.Event,
    *,
    interval_seconds: float = STATS_SECONDS,
    every_seconds: float = STATS_EVERY_SECONDS,
    push: Callable[[Stats], None] = emit,
) -> None:
    """Push the engine's figures (``Stats``) on stderr for the gateway's ``/metrics``: at once, then whenever they
    changed at a look every ``interval_seconds``, and at least every ``every_seconds``; until ``stop`` is set.

    A thread of its own: it only reads counters the engine keeps (a few ints and the KV pool's free lists), and
    the server's loop is left as uvicorn runs it. Pushing (not a scrape pulling ``/stats``) means a gateway's
    scrape never waits on a runner whose loop is busy prefilling.
    """
    last: Stats | None = None
    pushed_at = 0.0
    while True:
        try:
            now, current = time.monotonic(), Stats.of(stats())
        except Exception:  # an engine closing under it: nothing to report this time
            current = None
        if current is not None and (current != last or now - pushed_at >= every_seconds):
            push(current)
            last, pushed_at = current, now
        if stop.wait(interval_seconds):
            return


def build_app(launch: PlanFile, *, name: str | None = None) -> Any:
    """Everything short of listening: the loaded model behind its FastAPI app."""
    return _build(launch, name=name)[0]


def _build(launch: PlanFile, *, name: str | None) -> tuple[Any, Any]:
    """The app, and the engine behind it (whose figures ``serve`` pushes)."""
    from memserve.runner.app import create_app
    from memserve.runner.engine import make_engine

    started = time.time()
    report = LoadReport()
    source, plan = launch.source, launch.plan
    concurrency, queue = plan.concurrency, launch.queue

    for variable, value in ONEDNN_CACHE_ENV.items():  # read once, when torch first runs a oneDNN kernel
        os.environ.setdefault(variable, value)
    if plan.engine == "encoder":  # embeddings and classification: no KV cache, batched by token budget
        from memserve.runner.encoder import build_encoder

        return build_encoder(launch, name=name)

    def load() -> tuple[Any, Any, Any, str | None, Any]:
        from memserve.runner.kernels import tune_allocator
        from memserve.runner.lora import LoraBank

        tune_allocator()
        if plan.engine == IMAGE_TEXT:  # a vision-language checkpoint: its processor and generate, images included
            from memserve.runner.vision import load_image_text

            model, tokenizer, engine, bank = load_image_text(launch, report)
            engine.attach_lora(bank)
            return model, tokenizer, engine, None, bank
        model, tokenizer = load_model(source, plan, report)
        bank = LoraBank(model)  # before the engine: the warm-up then faults the adapters' weights in too
        for adapter, adapter_source in launch.adapters:
            bank.add(adapter, adapter_source)
        engine, fallback_reason = make_engine(
            model,
            prefer=os.environ.get(ENGINE_ENV) or plan.engine,
            max_sequences=concurrency,
            max_queue=queue,
            max_context_tokens=plan.context_tokens,
            max_batch_tokens=plan.max_batch_tokens,
        )

        current = [engine]

        def rebuild(sequences: int) -> Any:
            asyncio.run(current[0].close())  # no traffic yet: frees its KV cache before the smaller one is made
            gc.collect()
            smaller, _ = make_engine(
                model,
                prefer=current[0].name,
                max_sequences=sequences,
                max_queue=queue + concurrency - sequences,
                max_context_tokens=plan.context_tokens,
                max_batch_tokens=plan.max_batch_tokens,
            )
            current[0] = smaller
            return smaller

        engine = fit_to_reservation(engine, launch, report, rebuild)
        attach = getattr(engine, "attach_lora", None)  # memserve's engines (runner/front.py); not every Engine
        if attach is None:
            if launch.adapters:
                raise InvalidArgument(f"the {engine.name} engine takes no LoRA adapters; drop the plan's adapters")
            return model, tokenizer, engine, fallback_reason, None
        attach(bank)
        return model, tokenizer, engine, fallback_reason, bank

    model, tokenizer, engine, fallback_reason, bank = on_fresh_thread(
        load, name="memserve-load"
    )  # see runner/threads.py for why
    if fallback_reason:
        emit(EngineFallback(engine.name, fallback_reason))
    served_name = name or Path(source).name or source
    _test_balloon(served_name)
    eos = model.generation_config.eos_token_id
    stop_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())

    def health() -> dict[str, Any]:
        return {
            "state": report.state,
            "model": served_name,
            "source": source,
            "plan": launch.to_json()["plan"],  # with the pool's limits, as the plan file had it
            "load": report.to_json(),
            "engine_fallback_reason": fallback_reason,
            "memory": process_memory(),
            "adapters": [info.to_json() for info in bank.info()] if bank is not None else [],
            "uptime_seconds": round(time.time() - started, 3),
        }

    app = create_app(
        engine=engine,
        tokenizer=tokenizer,
        model_name=served_name,
        context_tokens=plan.context_tokens,
        health=health,
        stop_token_ids=stop_ids or None,
        completer_type=_completer_type(engine),
        adapters=bank,
    )
    adapters = tuple(bank.names()) if bank is not None else ()
    emit(Ready(served_name, engine.name, process_memory(), report.plan_check, adapters))
    return app, engine


def _completer_type(engine: Any) -> Any:
    """The app's completer: a vision-language model's processes its images with the text."""
    if engine.name != IMAGE_TEXT:
        return None
    from memserve.runner.vision import ImageCompleter

    return ImageCompleter


def serve(launch: PlanFile, *, name: str | None = None, port: int | None = None, socket: Path | None = None) -> None:
    """Load, then listen on a Unix socket or 127.0.0.1:port until stopped."""
    import uvicorn

    app, engine = _build(launch, name=name)
    if socket is not None:
        config = uvicorn.Config(
            app,
            uds=str(socket),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    else:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port or 8001,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    emit(Listening(str(socket) if socket else None, None if socket else config.port))
    stop = threading.Event()
    reporter = threading.Thread(target=report_stats, args=(engine.stats, stop), name="memserve-stats", daemon=True)
    reporter.start()
    try:
        uvicorn.Server(config).run()
    finally:
        stop.set()
