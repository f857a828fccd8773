"""``GET /api/memory`` reads the host as the watchdog does: the one cgroup-aware reading (``probe.host_memory``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import memserve.gateway.app as gateway_app
from memserve.memory.probe import HostMemory
from memserve.pool.pool import ModelPool
from tests.gateway.test_gateway_process import GiB, host, settings_for


def test_api_memory_shows_the_container_as_the_watchdog_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside_a_container = HostMemory(total_bytes=8 * GiB, available_bytes=2 * GiB)  # psutil would say the host's
    monkeypatch.setattr(gateway_app, "host_memory", lambda: inside_a_container)
    settings = settings_for(tmp_path, [])
    app = gateway_app.create_app(settings, ModelPool(settings, host(4 * GiB)))
    memory = TestClient(app.app).get("/api/memory").json()  # type: ignore[attr-defined]  # FastAPI behind hot routes
    assert memory["host"] == {"total_bytes": 8 * GiB, "available_bytes": 2 * GiB}
    assert memory["watchdog"]["tolerance"] == settings.watchdog_tolerance
