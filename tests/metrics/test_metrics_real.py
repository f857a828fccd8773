"""``/metrics`` with real runner processes on the demo models: a short known sequence, a kill -9 of the ready
runner, scrapes all along that answer and parse, and ``promtool check metrics`` on the result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from memserve.config import ModelConfig
from tests.fakes import LLAMA3_8B, write_sparse_checkpoint
from tests.gateway.test_gateway_process import chat, gateway, host, local, ps, room_for_one, settings_for
from tests.metrics.scrape import Scrape, gauges_not_negative

PROMTOOL_MISSING = "install Debian's prometheus package (apt-get install prometheus) for promtool and prometheus"


class Scraper:
    """Scrapes ``/metrics`` every 50 ms in a thread until stopped; keeps every failure it saw."""

    def __init__(self, origin: str) -> None:
        self.origin, self.scrapes, self.failures = origin, 0, list[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper")

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                answer = httpx.get(f"{self.origin}/metrics", timeout=30)
                if answer.status_code != 200:
                    self.failures.append(f"status {answer.status_code}")
                    continue
                scrape = Scrape(answer.text)
                self.failures += gauges_not_negative(scrape)
                self.scrapes += 1
            except Exception as exc:  # any failure to answer or to parse is what this looks for
                self.failures.append(f"{type(exc).__name__}: {exc}")


def scrape(origin: str) -> Scrape:
    answer = httpx.get(f"{origin}/metrics", timeout=30)
    assert answer.status_code == 200
    return Scrape(answer.text)


def wait_for(what: str, predicate: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_metrics_with_real_runners_and_a_kill_9(tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path) -> None:
    big = write_sparse_checkpoint(tmp_path / "llama-8b", LLAMA3_8B, shards=1)
    models = [
        local("llama", tiny_model_dir, keep_alive_seconds=60),
        local("qwen", tiny_qwen_dir, keep_alive_seconds=60),
        ModelConfig(name="big", source=str(big), context_tokens=4096),
    ]
    settings = settings_for(tmp_path, models)
    with gateway(settings, host(room_for_one(tiny_model_dir, tiny_qwen_dir))) as (origin, _), Scraper(origin) as s:
        assert chat(origin, "llama", stream=True).status_code == 200
        assert chat(origin, "llama").status_code == 200
        assert chat(origin, "nope").status_code == 404
        assert chat(origin, "qwen").status_code == 200  # evicts llama: the budget holds one
        assert chat(origin, "big").status_code == 507
        wait_for(
            "qwen's pushed figures", lambda: scrape(origin).value("memserve_num_requests_running", model="qwen") == 0
        )
        before = scrape(origin)
        pid = next(r["pid"] for r in ps(origin)["models"] if r["name"] == "qwen")
        held = before.value("memserve_model_held_bytes", model="qwen", device="cpu") or 0
        assert held > 0 and (before.value("memserve_device_held_bytes", device="cpu") or 0) >= held
        os.kill(pid, signal.SIGKILL)
        wait_for("the crash", lambda: scrape(origin).value("memserve_model_crashes_total", model="qwen") == 1)
        after = scrape(origin)
    assert s.scrapes > 0 and s.failures == [], s.failures[:5]

    assert after.value("memserve_model_state", model="qwen", state="failed") == 1
    assert after.value("memserve_model_state", model="qwen", state="ready") == 0
    assert after.series("memserve_model_reserved_bytes", model="qwen") == {}
    assert after.series("memserve_num_requests_running", model="qwen") == {}
    assert after.series("memserve_runner_stats_age_seconds") == {}
    assert (
        after.value("memserve_device_held_bytes", device="cpu")
        == (before.value("memserve_device_held_bytes", device="cpu") or 0) - held
    )
    assert after.value("memserve_model_evictions_total", model="llama", reason="make_room") == 1
    assert after.value("memserve_model_refusals_total", model="big", code="insufficient_memory") == 1
    assert after.value("memserve_model_loads_total", model="llama", rung="cpu") == 1
    assert after.value("memserve_time_to_first_token_seconds_count", model="llama", provider="local") == 1
    assert after.value("memserve_requests_total", model="(other)", provider="local", status_class="4xx",
                       code="model_not_found", key="") == 1  # fmt: skip
    for phase in ("resolve", "map", "fault_in", "warm_up"):
        assert (after.value("memserve_model_load_phase_seconds_count", model="llama", phase=phase) or 0) >= 1
    ratio = after.value("memserve_load_estimate_ratio_count", model="llama", device="cpu", outcome="ready")
    assert ratio == 1 and 0 < (after.value("memserve_model_estimate_ratio", model="llama", device="cpu") or 0) < 3
    if before.value("memserve_kv_cache_blocks", model="qwen"):  # the continuous-batching engine
        assert before.value("memserve_kv_cache_usage_ratio", model="qwen") == 0
    promtool(after.text, tmp_path)


def promtool(text: str, tmp_path: Path) -> None:
    """``promtool check metrics`` on ``text``: exit 0 and nothing printed; ``--extended`` kept as an artifact."""
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail(PROMTOOL_MISSING)
        pytest.skip(PROMTOOL_MISSING)
    checked = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b""), checked.stderr.decode()
    extended = subprocess.run(
        [tool, "check", "metrics", "--extended"], input=text.encode(), capture_output=True, timeout=60
    )
    artifacts = Path(os.environ.get("MEMSERVE_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "metrics.txt").write_text(text)
    (artifacts / "promtool-extended.txt").write_bytes(extended.stdout + extended.stderr)
