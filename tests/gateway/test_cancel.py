"""Work nobody waits for is cancelled: a client that goes away, or a request past ``request_timeout``.

A real gateway and runner (the tiny demo model with a long context, so a request can run for a while);
the runner's own ``/stats`` shows whether it is still generating.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.config import ModelConfig
from tests.gateway.test_gateway_process import GiB, gateway, host, ps, settings_for

LONG = {"model": "long", "prompt": "a", "temperature": 0}  # a completion the long model keeps generating


@pytest.fixture(scope="module")
def long_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """A model with a long context, loaded before the tests, and a one-second request deadline."""
    tmp = tmp_path_factory.mktemp("deadline")
    settings = settings_for(
        tmp,
        [ModelConfig(name="long", source=str(tiny_model_dir), context_tokens=2048, concurrency=2)],
        request_timeout_seconds=1.0,
    )
    with gateway(settings, host(4 * GiB)) as (origin, pool):
        assert httpx.post(f"{origin}/api/load", json={"model": "long"}, timeout=120).status_code == 200
        yield origin, pool


def runner_stats(origin: str) -> dict[str, Any]:
    socket = ps(origin)["models"][0]["socket"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket)) as client:
        return dict(client.get("http://runner/stats", timeout=10).json())


def wait_until_idle(origin: str) -> dict[str, Any]:
    """The runner's stats once nothing runs there (a generous deadline: this machine may be busy)."""
    deadline = time.monotonic() + 30
    while (stats := runner_stats(origin))["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def test_a_non_streamed_request_whose_client_leaves_stops_generating(long_gateway: Any) -> None:
    origin, _ = long_gateway
    before = runner_stats(origin)["generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):  # the deadline is 1 s: leave before it
        httpx.post(f"{origin}/v1/completions", json={**LONG, "max_tokens": 2000}, timeout=0.3)
    after = wait_until_idle(origin)
    assert after["running"] == 0
    assert after["generation_tokens_total"] - before < 2000
    assert ps(origin)["models"][0]["leases"] == 0


def test_request_timeout_ends_a_runaway_request_with_a_clear_error(long_gateway: Any) -> None:
    origin, _ = long_gateway
    whole = httpx.post(f"{origin}/v1/completions", json={**LONG, "max_tokens": 2000}, timeout=60)
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout", whole.text
    assert "request_timeout" in whole.json()["error"]["message"]
    with httpx.stream(
        "POST", f"{origin}/v1/completions", json={**LONG, "max_tokens": 2000, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert wait_until_idle(origin)["running"] == 0
    assert ps(origin)["models"][0]["leases"] == 0
