"""Run one runner: load by plan, build the engine, serve the OpenAI-compatible app on a socket or port."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from memserve.runner.load import LoadReport, emit, load_model, process_memory

DEFAULT_QUEUE_PER_SEQUENCE = 4
GRACEFUL_SHUTDOWN_SECONDS = 10  # then streams still open are cancelled and the engine closes
TEST_EXTRA_BYTES_ENV = "MEMSERVE_TEST_EXTRA_BYTES"
_BALLOON_CHUNK_BYTES = 8 << 20
_balloon: list[bytearray] = []
T = TypeVar("T")


def on_worker_thread(work: Callable[[], T]) -> T:
    """``work()`` on a short-lived thread; its result, or its exception re-raised here.

    Loading runs torch ops (reading every weight, the warm-up forward). libgomp gives each thread that
    runs parallel ops its own team of OpenMP workers; a team made by the main thread stays beside the
    generation thread's for the life of the process, and every step then runs ~25% slower on 2 cores
    (demo-small: 22 → 28 ms per forward, 50 → 37 tok/s, transformers 5.23, torch 2.13). A worker
    thread's team goes back to libgomp when the thread ends, and the generation thread reuses it.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed back to the caller below
            errors.append(exc)

    worker = threading.Thread(target=run, name="memserve-load", daemon=True)  # Ctrl-C while loading exits
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]


def _test_balloon(name: str) -> None:
    """Test hook, off unless ``MEMSERVE_TEST_EXTRA_BYTES=NAME=SIZE`` names this runner: while warming up,
    use SIZE more bytes than the plan says, 8 MiB every 10 ms (a load that lies about its memory), so that
    tests can prove the gateway's watchdog stops a runaway load before it crosses the budget."""
    target, _, size = os.environ.get(TEST_EXTRA_BYTES_ENV, "").partition("=")
    if not size or target != name:
        return
    from memserve.units import parse_bytes

    extra = parse_bytes(size, what=TEST_EXTRA_BYTES_ENV)
    emit({"event": "test_balloon", "extra_bytes": extra})
    while len(_balloon) * _BALLOON_CHUNK_BYTES < extra:
        _balloon.append(bytearray(b"\x01") * _BALLOON_CHUNK_BYTES)  # filled, so every page is really used
        time.sleep(0.01)


def build_app(source: str, plan: dict[str, Any], *, name: str | None = None, max_queue: int | None = None) -> Any:
    """Everything short of listening: the loaded model behind its FastAPI app."""
    from memserve.runner.app import create_app
    from memserve.runner.engine import make_engine

    started = time.time()
    report = LoadReport()
    concurrency = int(plan["concurrency"])

    def load() -> tuple[Any, Any, Any, str | None]:
        model, tokenizer = load_model(source, plan, report)
        engine, fallback_reason = make_engine(
            model,
            max_sequences=concurrency,
            max_queue=max_queue if max_queue is not None else DEFAULT_QUEUE_PER_SEQUENCE * concurrency,
            max_context_tokens=int(plan["context_tokens"]),
            max_batch_tokens=int(plan["max_batch_tokens"]),
        )
        return model, tokenizer, engine, fallback_reason

    model, tokenizer, engine, fallback_reason = on_worker_thread(load)
    if fallback_reason:
        emit({"event": "engine_fallback", "engine": engine.name, "reason": fallback_reason})
    served_name = name or Path(source).name or source
    _test_balloon(served_name)
    eos = model.generation_config.eos_token_id
    stop_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())

    def health() -> dict[str, Any]:
        return {
            "state": report.state,
            "model": served_name,
            "source": source,
            "plan": plan,
            "load": report.to_json(),
            "engine_fallback_reason": fallback_reason,
            "memory": process_memory(),
            "uptime_seconds": round(time.time() - started, 3),
        }

    app = create_app(engine=engine, tokenizer=tokenizer, model_name=served_name,
                     context_tokens=int(plan["context_tokens"]), health=health, stop_token_ids=stop_ids or None)
    emit({"event": "ready", "model": served_name, "engine": engine.name, "memory": process_memory()})
    return app


def serve(source: str, plan: dict[str, Any], *, name: str | None = None, port: int | None = None,
          socket: Path | None = None, max_queue: int | None = None) -> None:
    """Load, then listen on a Unix socket or 127.0.0.1:port until stopped."""
    import uvicorn

    app = build_app(source, plan, name=name, max_queue=max_queue)
    if socket is not None:
        config = uvicorn.Config(app, uds=str(socket), log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port or 8001, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    emit({"event": "listening", "socket": str(socket) if socket else None, "port": None if socket else config.port})
    uvicorn.Server(config).run()
