"""Debian's real Prometheus, on the shipped ``deploy/prometheus/prometheus.yml``, scraping a real ``memserve serve``
with keys on: the scrape authenticates with the admin key from its credentials file, as in compose.yaml.

The shipped file is changed only where a test must: the target (the test's port), the interval (1 s, so the
test waits seconds, not minutes) and the key file's path. What Prometheus scraped is checked through its HTTP
API (``/api/v1/targets``, ``/api/v1/query``), against what the gateway says in ``/api/memory``.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.grafana import dashboard, documented_names, expressions, family, variable_queries
from tests.deploy.programs import DEPLOY, program, stop, wait_for_port
from tests.serving import free_port, wait_until_healthy

SHIPPED = DEPLOY / "prometheus" / "prometheus.yml"
STREAMS = 2


@dataclass(frozen=True)
class Gateway:
    origin: str
    admin_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}


@dataclass(frozen=True)
class Prometheus:
    origin: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector (fails on an error answer)."""
        answer = httpx.get(f"{self.origin}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def target(self, job: str) -> dict[str, Any]:
        """The job's one active target as ``/api/v1/targets`` shows it; ``health`` is ``unknown`` until Prometheus
        has it (the list is empty for a moment after the start) and has tried a scrape."""
        answer = httpx.get(f"{self.origin}/api/v1/targets", params={"state": "active"}, timeout=10).json()
        found = [t for t in answer["data"]["activeTargets"] if t["labels"]["job"] == job]
        assert len(found) <= 1, found
        target: dict[str, Any] = found[0] if found else {"health": "unknown", "lastError": "not listed yet"}
        return target

    def wait_for_health(self, job: str, health: str) -> dict[str, Any]:
        """The target once its last scrape made it ``health`` (60 s at most: a few scrapes on a busy machine)."""
        deadline = time.monotonic() + 60
        while (target := self.target(job))["health"] != health:
            assert time.monotonic() < deadline, f"the target did not become {health}: {target}"
            time.sleep(0.2)
        return target

    def wait_until_scraped(self, job: str, series: str) -> dict[str, Any]:
        """The target once it is up and ``series`` is queryable."""
        target = self.wait_for_health(job, "up")
        deadline = time.monotonic() + 60
        while not self.query(series):
            assert time.monotonic() < deadline, f"Prometheus has no {series} from its target: {self.target(job)}"
            time.sleep(0.2)
        return target


def scrape_config(target: str, key_file: Path | None) -> dict[str, Any]:
    """The shipped configuration, aimed at ``target`` every second; with ``key_file`` None, without the key."""
    config: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    job.update(scrape_timeout="1s")
    job["static_configs"] = [{"targets": [target]}]
    if key_file is None:
        del job["authorization"]
    else:
        job["authorization"]["credentials_file"] = str(key_file)
    return config


@contextmanager
def prometheus_on(config: dict[str, Any], tmp_path: Path) -> Iterator[Prometheus]:
    """Debian's prometheus in the foreground, its data and log in ``tmp_path``, on a free port; SIGTERM at the end
    (and a check that it exited cleanly). The shipped file as the test changed it must pass ``promtool check
    config`` first."""
    binary = program("prometheus", "prometheus")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    promtool = program("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, f"promtool refused the shipped config as the test changed it:\n{checked.stderr}"
    port = free_port()
    log = tmp_path / "prometheus.log"
    argv = [
        binary,
        f"--config.file={path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, log, "prometheus")
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        stop(process, "prometheus")
        assert process.returncode == 0, f"prometheus exited {process.returncode} on SIGTERM: {log.read_text()[-2000:]}"


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """Asked for before ``served`` by the tests that run Prometheus, so that they skip before starting a gateway."""
    program("promtool", "prometheus")
    return program("prometheus", "prometheus")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Gateway]:
    """``memserve serve`` with keys on and the demo model, after ``STREAMS`` streamed answers (so request series
    exist as well as the memory ones)."""
    tmp_path = tmp_path_factory.mktemp("gateway")
    port = free_port()
    gateway = Gateway(f"http://127.0.0.1:{port}", f"ms-{secrets.token_urlsafe(24)}")
    env = {
        **os.environ,
        "MEMSERVE_DATA_DIR": str(tmp_path / "data"),
        "MEMSERVE_AUTH": "keys",
        "MEMSERVE_ADMIN_KEY": gateway.admin_key,
    }
    log = tmp_path / "gateway.log"
    argv = [sys.executable, "-m", "memserve", "serve", "--model", f"demo={tiny_model_dir}", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(gateway.origin, process, log=log)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        for _ in range(STREAMS):
            response = httpx.post(
                f"{gateway.origin}/v1/chat/completions", json=body, headers=gateway.headers, timeout=120
            )
            assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"), response.text
        yield gateway
    finally:
        stop(process, "memserve serve")


def test_prometheus_scrapes_memserve_with_the_admin_key(prometheus_bin: str, served: Gateway, tmp_path: Path) -> None:
    key_file = tmp_path / "memserve_admin_key"
    key_file.write_text(served.admin_key + "\n")  # as `print(key) > file` writes it: Prometheus trims the newline
    config = scrape_config(served.origin.removeprefix("http://"), key_file)
    with prometheus_on(config, tmp_path) as prometheus:
        target = prometheus.wait_until_scraped("memserve", "memserve_build_info")
        assert target["scrapeUrl"] == f"{served.origin}/metrics" and target["lastError"] == ""
        [ready] = prometheus.query('memserve_model_state{state="ready"} == 1')
        assert ready["metric"]["model"] == "demo"
        memory = httpx.get(f"{served.origin}/api/memory", headers=served.headers, timeout=10).json()
        capacity = {
            r["metric"]["device"]: float(r["value"][1]) for r in prometheus.query("memserve_device_capacity_bytes")
        }
        assert capacity == {device: float(d["capacity_bytes"]) for device, d in memory["devices"].items()}
        [streams] = prometheus.query('sum(memserve_time_to_first_token_seconds_count{model="demo"})')
        assert float(streams["value"][1]) >= STREAMS


def test_without_the_key_the_target_is_down_with_a_401(prometheus_bin: str, served: Gateway, tmp_path: Path) -> None:
    """The other side of the test above: the shipped authorization lines are what makes the scrape work."""
    with prometheus_on(scrape_config(served.origin.removeprefix("http://"), None), tmp_path) as prometheus:
        target = prometheus.wait_for_health("memserve", "down")
        assert "401" in target["lastError"], target


def test_every_series_the_dashboard_reads_is_one_metrics_declares(served: Gateway) -> None:
    """Each ``memserve_*`` family of deploy/grafana/memserve.json has its ``# TYPE`` line in ``GET /metrics``
    (a family is declared even before its first sample)."""
    response = httpx.get(f"{served.origin}/metrics", headers=served.headers, timeout=10)
    assert response.status_code == 200, response.text
    text = response.text
    declared = set(re.findall(r"^# TYPE (memserve_[a-z0-9_]+) ", text, re.M))
    declared |= {f"{name}_total" for name in declared}  # a counter family may be declared without its suffix
    documented = documented_names()
    board = dashboard()
    used = {
        family(name, documented)
        for _, expr in [*expressions(board), *variable_queries(board)]
        for name in re.findall(r"\bmemserve_[a-z0-9_]+", expr)
    }
    assert not sorted(used - declared), f"/metrics does not declare {sorted(used - declared)}"
