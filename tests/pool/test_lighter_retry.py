"""The watchdog's lighter retry with real runner processes: a CPU load stopped by the watchdog is loaded again one
rung lighter (int8), serves, and the events say what was tried and why."""

from __future__ import annotations

from pathlib import Path

import httpx

from memserve.gateway.app import create_app
from memserve.pool.pool import ModelPool
from tests.gateway.test_gateway_process import chat, host, local, ps, runner_pids, settings_for
from tests.serving import serve_app

MiB, GiB = 1 << 20, 1 << 30


def test_a_cpu_load_stopped_at_the_host_floor_is_served_at_int8(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Memory taken by others (the host's available memory drops below the floor once, while the bf16 runner
    loads): that runner is killed, and the same load goes on one rung lower, where a real runner quantizes the
    model to int8 and answers."""
    settings = settings_for(tmp_path, [local("tiny", tiny_model_dir)])
    pool: ModelPool | None = None
    dropped: list[int] = []

    def available_bytes() -> int:
        assert pool is not None
        entry = pool.entries["tiny"]
        if not dropped and entry.runner is not None and entry.plan is not None and entry.plan.rung == "cpu":
            dropped.append(100 * MiB)
            return 100 * MiB  # below the 256 MiB floor, once
        return 16 * GiB

    pool = ModelPool(settings, host(4 * GiB), host_available_bytes=available_bytes)
    with serve_app(create_app(settings, pool), lifespan=True) as origin:
        answer = chat(origin, "tiny")
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
        [row] = ps(origin)["models"]
        assert row["rung"] == "cpu-int8" and row["quantization"] == "int8" and row["state"] == "ready"
        events = httpx.get(f"{origin}/api/events", timeout=10).json()["events"]
    assert not runner_pids(), "the gateway left runner processes behind"
    assert dropped == [100 * MiB]
    assert [e["rung"] for e in events if e["event"] == "load"] == ["cpu", "cpu-int8"]
    [kill] = [e for e in events if e["event"] == "watchdog_kill"]
    assert kill["available_bytes"] == 100 * MiB and "below the floor" in kill["reason"]
    [lower] = [e for e in events if e["event"] == "retry_lower"]
    assert (lower["failed_rung"], lower["rung"]) == ("cpu", "cpu-int8")
    assert "below the floor" in lower["reason"]
    assert lower["failed_reserved_bytes"]["cpu"] > 0 and lower["measured_bytes"]["cpu"] > 0
    assert lower["reserved_bytes"]["cpu"] > 0
