"""``GET /metrics`` on a gateway with scripted runners: every series after a known sequence, a scrape during a
load, bounded labels, and who may read it.

The runners are ``tests/pool/fake_runner.py``'s, answering with the fake OpenAI server; the provider is a fake
OpenAI server on 127.0.0.1. The gateway runs in a ``TestClient`` with its lifespan (store, pool, shutdown).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from memserve.config import ModelConfig, ProviderConfig, Settings
from memserve.gateway.app import FALLBACK_HEADER, create_app
from memserve.gateway.metrics import all_families
from memserve.pool.pool import ModelPool
from memserve.pool.state import ModelState
from memserve.tally import ITL_BUCKETS
from memserve.wire.events import Stats
from memserve.wire.fake import FakeOpenAI
from tests.metrics.scrape import Scrape, gauges_not_negative, label_values
from tests.pool.fake_runner import FakeSpawner, RunnerScript
from tests.pool.test_pool import ONE_MODEL_GIB, PLENTY_BYTES, cpu_host, read_facts
from tests.serving import serve_fake

END_USER = "end-user-7f3a"  # sent as the OpenAI user field: it must never become a label
MAX_TOKENS = 3


def chat(model: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
        **extra,
    }


@dataclass
class Gateway:
    client: TestClient
    pool: ModelPool
    spawner: FakeSpawner

    def scrape(self, **headers: str) -> Scrape:
        response = self.client.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
        return Scrape(response.text)

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the gateway's loop (the pool's objects belong to it)."""
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not self.on_loop(predicate):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)


@contextmanager
def gateway(
    tmp_path: Path, models: list[ModelConfig], *, script: RunnerScript | None = None, **settings: Any
) -> Iterator[Gateway]:
    runner_answers = FakeOpenAI(models=[m.name for m in models], reply_text="one two three four five six")
    with serve_fake(FakeOpenAI(models=["gpt-x"])) as cloud:
        config = Settings(
            models=models,
            providers=[ProviderConfig(name="cloud", base_url=cloud.base_url, models=["gpt-x"])],
            data_dir=tmp_path,
            keep_alive_seconds=60,
            memory_wait_seconds=0.2,
            watchdog_interval_seconds=0.02,
            watchdog_loading_interval_seconds=0.02,
            **settings,
        )
        spawner = FakeSpawner(script or RunnerScript(app=runner_answers))
        pool = ModelPool(
            config,
            cpu_host(ONE_MODEL_GIB),
            spawner=spawner,
            host_available_bytes=lambda: PLENTY_BYTES,
            facts_reader=read_facts,
        )
        with TestClient(create_app(config, pool)) as client:
            yield Gateway(client, pool, spawner)


def local(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {"name": name, "source": f"mem://{name}", "context_tokens": 2048, "concurrency": 1, **fields}
    )


MODELS = [local("a"), local("b", max_queue=0, fallback="cloud/gpt-x"), local("big")]


def test_every_series_after_a_known_sequence(tmp_path: Path) -> None:
    with gateway(tmp_path, MODELS) as g:
        post = g.client.post
        for _ in range(2):
            streamed = post("/v1/chat/completions", json=chat("a", stream=True))
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert post("/v1/chat/completions", json=chat("a")).json()["usage"]["completion_tokens"] == MAX_TOKENS
        a_runner = g.spawner.runners("a")[0]
        g.on_loop(a_runner.push_stats, Stats(running=1, waiting=2, kv_cache_blocks=100, kv_cache_blocks_used=25))
        loaded = g.scrape()
        assert post("/v1/chat/completions", json=chat("nope")).status_code == 404
        assert post("/v1/chat/completions", json=chat("cloud/gpt-x", user=END_USER)).status_code == 200
        assert post("/api/load", json={"model": "b"}).status_code == 200  # evicts a: room for one only
        assert post("/v1/chat/completions", json=chat("big")).status_code == 507
        lease = g.on_loop(g.pool.acquire, "b")  # b's one slot is taken and it has no queue: the next is refused
        fallen = post("/v1/chat/completions", json=chat("b"))
        assert fallen.status_code == 200 and fallen.headers[FALLBACK_HEADER] == "cloud/gpt-x"
        g.on_loop(lease.release)
        b_runner = g.spawner.runners("b")[0]
        held_by_b = g.pool.ledger.held("b")["cpu"]
        held_before = g.scrape().value("memserve_device_held_bytes", device="cpu")
        g.on_loop(b_runner.exit, -9)  # the ready runner dies
        g.wait(lambda: g.pool.entries["b"].state == ModelState.FAILED, "b's crash")
        s = g.scrape()

    # while a was loaded: its plan, its memory and the figures its runner pushed
    assert loaded.value("memserve_model_state", model="a", state="ready") == 1
    assert loaded.value("memserve_model_plan_info", model="a", rung="cpu", dtype="bfloat16", quantization="none",
                        engine="continuous-batching") == 1  # fmt: skip
    assert loaded.value("memserve_model_context_tokens", model="a") == 2048
    assert loaded.value("memserve_model_concurrency", model="a") == 1
    assert (loaded.value("memserve_model_reserved_bytes", model="a", device="cpu") or 0) > 0
    assert loaded.value("memserve_num_requests_running", model="a") == 1
    assert loaded.value("memserve_num_requests_waiting", model="a") == 2
    assert loaded.value("memserve_kv_cache_blocks", model="a") == 100
    assert loaded.value("memserve_kv_cache_usage_ratio", model="a") == 0.25
    assert 0 <= (loaded.value("memserve_runner_stats_age_seconds", model="a") or -1) < 60
    assert (loaded.value("memserve_model_expiry_timestamp_seconds", model="a") or 0) > time.time()

    # requests: one per request, by outcome; tokens from the answers' usage
    requests = {
        (labels["model"], labels["provider"], labels["status_class"], labels["code"]): value
        for labels, value in ((dict(k), v) for k, v in s.series("memserve_requests_total").items())
    }
    assert requests == {
        ("a", "local", "2xx", ""): 3,
        ("(other)", "local", "4xx", "model_not_found"): 1,
        ("cloud/gpt-x", "cloud", "2xx", ""): 1,
        ("big", "local", "5xx", "insufficient_memory"): 1,
        ("b", "cloud", "2xx", ""): 1,
    }
    assert s.labels_of("memserve_requests_total", "key") == {""}  # auth off: no key names
    assert s.value("memserve_generation_tokens_total", model="a", provider="local", key="") == 3 * MAX_TOKENS
    assert (s.value("memserve_prompt_tokens_total", model="a", provider="local", key="") or 0) > 0
    assert s.value("memserve_time_to_first_token_seconds_count", model="a", provider="local") == 2
    assert s.value("memserve_e2e_request_latency_seconds_count", model="a", provider="local") == 3
    assert s.value("memserve_request_generation_tokens_count", model="a", provider="local") == 3
    assert s.value("memserve_request_generation_tokens_sum", model="a", provider="local") == 3 * MAX_TOKENS
    assert s.value("memserve_request_prompt_tokens_count", model="a", provider="local") == 3
    assert s.value("memserve_request_time_per_output_token_seconds_count", model="a", provider="local") == 2
    itl = s.value("memserve_inter_token_latency_seconds_count", model="a", provider="local") or 0
    assert 0 < itl <= 2 * MAX_TOKENS  # gaps between text events (chunks may carry several)
    le = {dict(k)["le"] for k in s.series("memserve_inter_token_latency_seconds_bucket")}
    assert len(le) == len(ITL_BUCKETS) + 1 and "+Inf" in le
    assert s.value("memserve_request_queue_time_seconds_count", model="a") == 3
    assert s.value("memserve_request_queue_time_seconds_count", model="b") is None, "a refused lease never queued"
    assert s.value("memserve_e2e_request_latency_seconds_count", model="big", provider="local") is None
    assert s.value("memserve_fallbacks_total", model="b", provider="cloud", code="queue_full") == 1
    assert s.total("memserve_requests_in_flight") == 0

    # lifecycle
    assert s.value("memserve_model_loads_total", model="a", rung="cpu") == 1
    assert s.value("memserve_model_loads_total", model="b", rung="cpu") == 1
    assert s.value("memserve_model_loads_total", model="big", rung="cpu") == 0  # pre-created
    assert s.value("memserve_model_evictions_total", model="a", reason="make_room") == 1
    assert s.total("memserve_model_evictions_total") == 1
    assert s.value("memserve_model_refusals_total", model="big", code="insufficient_memory") == 1
    assert s.value("memserve_model_refusals_total", model="b", code="queue_full") == 1
    assert s.total("memserve_model_refusals_total") == 2
    assert s.value("memserve_model_crashes_total", model="b") == 1
    assert s.total("memserve_model_crashes_total") == 1
    assert s.total("memserve_watchdog_kills_total") == 0
    assert s.value("memserve_model_load_duration_seconds_count", model="a") == 1
    assert s.value("memserve_model_load_phase_seconds_count", model="b", phase="warm_up") == 1

    # states and memory after the crash: nothing left as loaded
    for model, state in (("a", "stopped"), ("b", "failed"), ("big", "stopped")):
        states = {dict(k)["state"]: v for k, v in s.series("memserve_model_state", model=model).items()}
        assert states == {str(st): float(st == state) for st in ModelState}, model
    assert s.series("memserve_model_reserved_bytes") == {}
    assert s.series("memserve_model_held_bytes") == {}
    assert s.series("memserve_model_plan_info") == {}
    assert s.series("memserve_num_requests_running") == {} and s.series("memserve_kv_cache_usage_ratio") == {}
    assert s.value("memserve_model_consecutive_failures", model="b") == 1
    assert s.value("memserve_device_held_bytes", device="cpu") == (held_before or 0) - held_by_b == 0
    assert s.value("memserve_device_free_bytes", device="cpu") == s.value("memserve_device_usable_bytes", device="cpu")
    assert (s.value("memserve_device_capacity_bytes", device="cpu") or 0) > 0
    assert s.value("memserve_host_available_bytes") == PLENTY_BYTES
    assert s.total("memserve_model_leases") == 0 and s.total("memserve_model_queued_requests") == 0
    assert s.value("memserve_build_info", version=__import__("memserve").__version__) == 1

    assert END_USER not in s.text, "an end user must never be a label"
    assert not gauges_not_negative(s)
    assert s.value("process_resident_memory_bytes") is not None, "the gateway's own process series"
    declared = {f.name + ("_total" if f.kind == "counter" else "") for f in all_families()}
    assert set(s.types) - {"process"} <= {n.removesuffix("_total") for n in declared} | {
        n for n in s.types if n.startswith("process_")
    }


def test_a_scrape_during_a_load_answers_and_stays_consistent(tmp_path: Path) -> None:
    script = RunnerScript(ready_after_seconds=None)  # loads until the test says
    with gateway(tmp_path, [local("a")], script=script) as g:
        g.client.portal.start_task_soon(g.pool.acquire, "a")  # type: ignore[union-attr]
        g.wait(lambda: bool(g.spawner.spawned), "the runner's start")
        s = g.scrape()
        states = {dict(k)["state"]: v for k, v in s.series("memserve_model_state", model="a").items()}
        assert states["starting"] + states["loading"] + states["warming"] == 1 and states["ready"] == 0
        assert s.value("memserve_model_queued_requests", model="a") == 1
        assert s.series("memserve_num_requests_running") == {} and s.series("memserve_model_plan_info") != {}
        assert (s.value("memserve_model_reserved_bytes", model="a", device="cpu") or 0) > 0
        assert not gauges_not_negative(s)
        g.on_loop(g.spawner.spawned[0].exit, -9)  # killed mid-load
        g.wait(lambda: g.pool.entries["a"].state == ModelState.FAILED, "the failed load")
        s = g.scrape()
        assert s.value("memserve_model_state", model="a", state="failed") == 1
        assert s.series("memserve_model_reserved_bytes") == {} and s.series("memserve_model_plan_info") == {}
        assert s.value("memserve_model_load_failures_total", model="a") == 1
        assert s.value("memserve_model_crashes_total", model="a") == 0, "a kill during a load is not a crash"
        assert s.value("memserve_device_held_bytes", device="cpu") == 0
        assert not gauges_not_negative(s)


def test_random_names_and_users_leave_the_number_of_series_unchanged(tmp_path: Path) -> None:
    rng = random.Random(14)
    with gateway(tmp_path, [local("a")]) as g:
        g.wait(lambda: g.pool.host_available_bytes is not None, "the host watchdog's first sample")
        g.client.post("/v1/chat/completions", json=chat(f"m-{rng.random()}", user="first"))
        g.client.post("/v1/chat/completions", json=chat(f"cloud/x-{rng.random()}", user="first"))
        before = g.scrape()
        for i in range(200):
            model = f"cloud/{rng.random()}" if i % 2 else f"m-{rng.random()}"
            g.client.post("/v1/chat/completions", json=chat(model, user=f"user-{rng.random()}"))
        after = g.scrape()
    series = lambda s: {k for k in s.samples if not k[0].startswith("process_")}  # noqa: E731
    assert series(after) == series(before)
    assert after.total("memserve_requests_total") == before.total("memserve_requests_total") + 200
    assert not any(value.startswith(("m-", "user-", "first")) for value in label_values(after))


@pytest.mark.parametrize("public", [False, True])
def test_with_keys_metrics_needs_an_admin_key_unless_public(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, public: bool
) -> None:
    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", "ms-admin-secret")
    with gateway(tmp_path, [local("a")], auth="keys", metrics_public=public) as g:
        admin = {"authorization": "Bearer ms-admin-secret"}
        created = g.client.post("/api/keys", json={"name": "app"}, headers=admin)
        assert created.status_code in (200, 201), created.text
        user_key = created.json()["secret"]
        answered = g.client.post(
            "/v1/chat/completions", json=chat("a"), headers={"authorization": f"Bearer {user_key}"}
        )
        assert answered.status_code == 200
        nobody = g.client.get("/metrics")
        user = g.client.get("/metrics", headers={"authorization": f"Bearer {user_key}"})
        if public:
            assert nobody.status_code == 200 and user.status_code == 200
        else:
            assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "invalid_api_key"
            assert user.status_code == 403
        s = g.scrape(authorization="Bearer ms-admin-secret")
        assert s.value("memserve_requests_total", model="a", provider="local", status_class="2xx", code="",
                       key="app") == 1  # fmt: skip
