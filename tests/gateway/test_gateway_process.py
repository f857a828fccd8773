"""The gateway with real runner processes on the tiny demo models: sharing, swapping under a budget,
keep-alive, kill -9 mid-stream, the watchdog against a load that lies, refusals, providers and fallback.

Each test serves ``create_app`` with uvicorn in a thread (lifespan on, so shutdown stops the runners)
and speaks to it over 127.0.0.1 like any client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from click.testing import CliRunner

from memserve.cli import main
from memserve.config import ModelConfig, ProviderConfig, Settings
from memserve.engines.fit import fit_result
from memserve.gateway.app import FALLBACK_HEADER, FALLBACK_REASON_HEADER, create_app
from memserve.memory.inventory import Device, Inventory
from memserve.pool.pool import ModelPool
from memserve.runner.serve import TEST_EXTRA_BYTES_ENV
from tests.fakes import LLAMA3_8B, write_sparse_checkpoint
from tests.serving import FakeOpenAI, free_port, nothing_listening, serve_app, serve_fake, wait_until_healthy

MiB, GiB = 1 << 20, 1 << 30
CHAT = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 8, "temperature": 0}
HEADROOM = 64 * MiB


def host(budget_bytes: int) -> Inventory:
    """A cpu-only host whose usable memory is ``budget_bytes`` minus a small headroom."""
    return Inventory(
        (
            Device(
                "cpu",
                "cpu",
                24 * GiB,
                20 * GiB,
                budget_bytes=budget_bytes,
                headroom_bytes=HEADROOM,
                description="test host",
            ),
        )
    )


def local(name: str, source: Path, **extra: Any) -> ModelConfig:
    return ModelConfig(name=name, source=str(source), context_tokens=256, concurrency=2, **extra)


def room_for_one(*sources: Path, times: float = 1.5) -> int:
    """A budget that holds the largest of these models' plans (as ``local`` configures them) once, never twice."""
    plans = [fit_result(str(s), context=256, concurrency=2, inventory=host(8 * GiB))[2].plan for s in sources]
    return int(times * max(p.reserved_bytes["cpu"] for p in plans if p is not None)) + HEADROOM


@contextmanager
def gateway(settings: Settings, inventory: Inventory) -> Iterator[tuple[str, ModelPool]]:
    pool = ModelPool(settings, inventory)
    with serve_app(create_app(settings, pool), lifespan=True) as origin:
        yield origin, pool
    assert not runner_pids(), "the gateway left runner processes behind"


def runner_pids() -> list[int]:
    me = psutil.Process()
    return [
        p.pid
        for p in me.children(recursive=True)
        if "memserve.runner" in " ".join(_cmdline(p)) and p.status() != psutil.STATUS_ZOMBIE
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def settings_for(tmp_path: Path, models: list[ModelConfig], **extra: Any) -> Settings:
    return Settings(
        models=models,
        data_dir=tmp_path / "data",
        memory_wait_seconds=5,
        watchdog_interval_seconds=0.1,
        watchdog_loading_interval_seconds=0.02,
        **extra,
    )


def chat(origin: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{origin}/v1/chat/completions", json={**CHAT, "model": model, **extra}, timeout=120)


def ps(origin: str) -> dict[str, Any]:
    return httpx.get(f"{origin}/api/ps", timeout=10).json()


def test_two_clients_on_two_endpoints_share_one_runner(tmp_path: Path, tiny_model_dir: Path) -> None:
    import openai

    settings = settings_for(tmp_path, [local("demo", tiny_model_dir)])
    with gateway(settings, host(4 * GiB)) as (origin, pool):
        results: dict[str, Any] = {}

        def first() -> None:
            results["chat"] = chat(origin, "demo")

        def second() -> None:
            results["text"] = httpx.post(
                f"{origin}/v1/completions", timeout=120, json={"model": "demo", "prompt": "once upon", "max_tokens": 8}
            )

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["chat"].status_code == 200, results["chat"].text
        assert results["text"].status_code == 200, results["text"].text
        assert results["chat"].json()["choices"][0]["message"]["content"]
        assert results["text"].json()["choices"][0]["text"]
        rows = ps(origin)["models"]
        assert [r["name"] for r in rows] == ["demo"] and rows[0]["state"] == "ready"
        assert runner_pids() == [rows[0]["pid"]]  # one process, so one copy of the weights
        assert [e["event"] for e in pool.events].count("load") == 1

        client = openai.OpenAI(base_url=f"{origin}/v1", api_key="unused")
        try:
            pieces = [
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="demo", messages=CHAT["messages"], max_tokens=8, temperature=0, stream=True
                )
                if c.choices
            ]
            assert "".join(pieces)
            whole = client.chat.completions.create(model="demo", messages=CHAT["messages"], max_tokens=8, temperature=0)
            assert whole.choices[0].message.content == "".join(pieces)  # greedy: streamed equals whole
        finally:
            client.close()
        if shutil.which("curl"):
            payload = json.dumps({**CHAT, "model": "demo", "stream": True})
            out = subprocess.run(
                ["curl", "-sN", f"{origin}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", payload],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            assert out.rstrip().endswith("data: [DONE]") and '"content"' in out
        assert runner_pids() == [rows[0]["pid"]]

        cli = CliRunner()
        listed = cli.invoke(main, ["ps", "--json", "--url", origin])
        assert listed.exit_code == 0 and json.loads(listed.output)["models"][0]["pid"] == rows[0]["pid"]
        unloaded = cli.invoke(main, ["unload", "demo", "--url", origin])
        assert unloaded.exit_code == 0 and "unloaded demo" in unloaded.output
        assert not runner_pids() and ps(origin)["models"] == []


def test_sigterm_drains_and_stops_the_runners(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MEMSERVE_DATA_DIR": str(tmp_path / "data")}
    gateway_proc = subprocess.Popen(
        [sys.executable, "-m", "memserve", "serve", "--model", f"demo={tiny_model_dir}", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_healthy(origin, gateway_proc)
        pid = httpx.post(f"{origin}/api/load", json={"model": "demo"}, timeout=120).json()["model"]["pid"]
        assert psutil.pid_exists(pid)
        gateway_proc.send_signal(signal.SIGTERM)
        # uvicorn drains, runs the lifespan shutdown (which stops the runners), then re-raises the signal
        assert gateway_proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if gateway_proc.poll() is None:
            gateway_proc.kill()
            gateway_proc.wait()


def test_budget_for_one_model_swaps_them_and_idle_models_expire(
    tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path
) -> None:
    # 1.2 ×, not 1.5: a tiny model's plan is nearly all runtime, and its runner can measure 0.76 of it when
    # torch's libraries are partly out of the page cache; two such measured needs must still not fit
    budget = room_for_one(tiny_model_dir, tiny_qwen_dir, times=1.2)
    settings = settings_for(
        tmp_path,
        [local("llama", tiny_model_dir, keep_alive_seconds=60), local("qwen", tiny_qwen_dir, keep_alive_seconds=60)],
    )
    with gateway(settings, host(budget)) as (origin, pool):
        usable = pool.ledger.usable_bytes()["cpu"]
        pids = []
        for name in ["llama", "qwen", "llama", "qwen"]:
            assert chat(origin, name).status_code == 200
            rows = ps(origin)["models"]
            assert [(r["name"], r["state"]) for r in rows] == [(name, "ready")]
            reserved = sum(r["devices"]["cpu"]["reserved_bytes"] for r in rows)
            assert reserved <= usable
            pids.append(rows[0]["pid"])
            assert runner_pids() == [rows[0]["pid"]]
        assert len(set(pids)) == 4
        assert [e["model"] for e in pool.events if e["event"] == "evict"] == ["llama", "qwen", "llama"]

        # keep_alive per request (Ollama-style): this one expires a second after its answer
        assert chat(origin, "qwen", keep_alive="1s").status_code == 200
        deadline = time.monotonic() + 15
        while ps(origin)["models"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ps(origin)["models"] == []
        assert not runner_pids()
        assert any(e["event"] == "stopped" and "keep_alive" in e["reason"] for e in pool.events)


def test_kill_9_mid_stream_fails_that_stream_and_the_next_request_reloads(
    tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path
) -> None:
    settings = settings_for(tmp_path, [local("llama", tiny_model_dir), local("qwen", tiny_qwen_dir)])
    with gateway(settings, host(4 * GiB)) as (origin, _):
        assert chat(origin, "qwen").status_code == 200
        assert chat(origin, "llama").status_code == 200
        pid = next(r["pid"] for r in ps(origin)["models"] if r["name"] == "llama")
        body = {"model": "llama", "prompt": "a", "max_tokens": 240, "temperature": 0, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{origin}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 2:
                    os.kill(pid, signal.SIGKILL)
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        errors = [d["error"] for d in data if "error" in d]
        assert [line for line in lines if line][-1] == "data: [DONE]" and len(errors) == 1, lines[-4:]
        assert "runner llama" in errors[0]["message"]

        def llama() -> dict[str, Any]:
            return next(r for r in ps(origin)["models"] if r["name"] == "llama")

        deadline = time.monotonic() + 120  # the pool marks it failed once it reaps the runner; a bound, not a race
        while llama()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        row = llama()
        assert row["state"] == "failed" and "SIGKILL" in row["reason"]
        assert chat(origin, "qwen").status_code == 200  # the other model never noticed

        again = chat(origin, "llama")
        assert again.status_code == 200, again.text
        row = llama()
        assert row["state"] == "ready" and row["pid"] != pid
        assert httpx.get(f"{origin}/health").json()["status"] == "ok"


def test_a_load_that_lies_is_killed_by_the_watchdog_before_the_budget_is_crossed(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_EXTRA_BYTES_ENV, "liar=3GiB")  # this runner uses 3 GiB more than its plan
    budget = room_for_one(tiny_model_dir)
    liar = local("liar", tiny_model_dir, policy={"quantization": "none"})  # no lighter CPU rung to retry on
    settings = settings_for(tmp_path, [liar], watchdog_tolerance_min_bytes=64 * MiB)
    with gateway(settings, host(budget)) as (origin, pool):
        answer = chat(origin, "liar")
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "runner_failed" and "watchdog" in error["message"]
        kills = [e for e in pool.events if e["event"] == "watchdog_kill"]
        # a kill is not an outage: what the first kill measured is reserved for a second try on the same rung
        # when that still fits; a second kill there (no lower rung: this model is never quantized) ends it
        assert 1 <= len(kills) <= 2
        if len(kills) == 2:
            assert kills[1]["limit_bytes"] > kills[0]["measured_bytes"]
        for kill in kills:
            # stopped at the first sample past plan + tolerance: the one before was within it (how far the balloon
            # grew between the two depends on how late the sample came on a busy host, so no bound on the step) ...
            assert kill["previous_bytes"] <= kill["limit_bytes"] < kill["measured_bytes"]
            # ... which is below the budget: it was never crossed at all
            assert kill["measured_bytes"] < budget
        assert ps(origin)["models"][0]["state"] == "failed"
        assert httpx.get(f"{origin}/health").json()["status"] == "ok"


def test_a_model_larger_than_the_budget_is_refused_at_once_with_bytes_and_options(tmp_path: Path) -> None:
    big = write_sparse_checkpoint(tmp_path / "llama-8b", LLAMA3_8B, shards=2)
    settings = settings_for(tmp_path, [ModelConfig(name="big", source=str(big), context_tokens=4096)])
    # "at once": refused from the headers alone, before any memory wait or runner (no timing assertion)
    settings = settings.model_copy(update={"memory_wait_seconds": 3600.0})
    with gateway(settings, host(2 * GiB)) as (origin, pool):
        answer = chat(origin, "big")
        assert answer.status_code == 507
        error = answer.json()["error"]
        assert error["code"] == "insufficient_memory" and error["param"] == "model"
        # the lightest rung is the closest: Llama-3-8B's 15.0 GiB of bf16 weights are 6.0 GiB in 4-bit
        assert re.search(r"closest is cpu-4bit: cpu needs 9\.\d GiB \(weights 6\.0 GiB", error["message"]), error[
            "message"
        ]
        assert "1.9 GiB usable" in error["message"]
        assert [e["event"] for e in pool.events] == ["refused"]  # never admitted, waited or spawned
        assert not runner_pids() and ps(origin)["models"] == []


def test_providers_fallback_and_bad_input(tmp_path: Path) -> None:
    big = write_sparse_checkpoint(tmp_path / "llama-8b", LLAMA3_8B, shards=1)
    with serve_fake(FakeOpenAI(models=("m1",))) as fake, nothing_listening() as dead:
        settings = settings_for(
            tmp_path,
            [
                ModelConfig(name="big", source=str(big), context_tokens=4096, fallback="fake/m1"),
                ModelConfig(name="big2", source=str(big), context_tokens=4096, fallback="dead/x"),
            ],
            providers=[
                ProviderConfig(name="fake", base_url=fake.base_url, api_key_env="FAKE_KEY", models=["m1"]),
                ProviderConfig(name="dead", base_url=dead, models=["x"]),
            ],
            max_body_bytes=4096,
        )
        os.environ["FAKE_KEY"] = "sekrit"
        try:
            with gateway(settings, host(2 * GiB)) as (origin, _):
                direct = chat(origin, "fake/m1")
                assert direct.status_code == 200 and direct.json()["model"] == "m1"
                assert fake.requests[-1].authorization == "Bearer sekrit"

                with httpx.stream(
                    "POST",
                    f"{origin}/v1/chat/completions",
                    timeout=30,
                    json={**CHAT, "model": "fake/m1", "stream": True},
                ) as response:
                    streamed = [line for line in response.iter_lines() if line.startswith("data: ")]
                assert streamed[-1] == "data: [DONE]" and len(streamed) > 2

                spilled = chat(origin, "big")
                assert spilled.status_code == 200, spilled.text
                assert spilled.headers[FALLBACK_HEADER] == "fake/m1"
                assert spilled.headers[FALLBACK_REASON_HEADER] == "insufficient_memory"

                down = chat(origin, "dead/x")
                assert down.status_code == 502 and "provider dead" in down.json()["error"]["message"]
                both_failed = chat(origin, "big2")  # the fallback's error names the local model and why it fell back
                message = both_failed.json()["error"]["message"]
                assert both_failed.status_code == 502 and both_failed.headers.get("x-memserve-fallback") is None
                assert "'big2' could not be served here" in message and "cannot fit" in message
                assert "dead/x failed too" in message and "provider dead" in message

                unknown = chat(origin, "bgi")
                assert unknown.status_code == 404 and "big" in unknown.json()["error"]["message"]
                as_json = {"content-type": "application/json"}
                too_big = httpx.post(f"{origin}/v1/chat/completions", content=b"x" * 5000, headers=as_json, timeout=10)
                assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
                bad_load = httpx.post(f"{origin}/api/load", json={"model": "big", "colour": 1}, timeout=10)
                assert bad_load.status_code == 400 and bad_load.json()["error"]["param"] == "colour"
                garbled = httpx.post(f"{origin}/v1/chat/completions", content=b"{nope", headers=as_json, timeout=10)
                assert garbled.status_code == 400 and "JSON" in garbled.json()["error"]["message"]
                not_json = httpx.post(f"{origin}/v1/chat/completions", content=b"{}", timeout=10)
                assert not_json.status_code == 415 and not_json.json()["error"]["code"] == "unsupported_media_type"
                busy = chat(origin, "big", keep_alive="soon")  # a bad field on the fast path: the same error shape
                assert busy.status_code == 400 and "keep_alive" in busy.json()["error"]["message"]
                assert set(busy.json()["error"]) == {"message", "type", "param", "code"}
                wrong_method = httpx.get(f"{origin}/v1/chat/completions", timeout=10)  # not the fast path: FastAPI
                assert wrong_method.status_code == 405
                assert wrong_method.json()["error"]["message"] == (
                    "GET /v1/chat/completions is not allowed; use POST /v1/chat/completions"
                )

                fit = httpx.get(f"{origin}/api/fit", params={"model": "big"}, timeout=30).json()
                assert fit["plan"] is None and "does not fit" in fit["nofit"]["message"]
                memory = httpx.get(f"{origin}/api/memory").json()
                assert memory["devices"]["cpu"]["usable_bytes"] == 2 * GiB - HEADROOM
                events = httpx.get(f"{origin}/api/events").json()["events"]
                assert [(e["model"], e["code"]) for e in events if e["event"] == "refused"] == [
                    ("big", "insufficient_memory"),
                    ("big2", "insufficient_memory"),
                ]

                models = {m["id"] for m in httpx.get(f"{origin}/v1/models").json()["data"]}
                assert models == {"big", "big2", "fake/m1", "dead/x"}
                assert httpx.get(f"{origin}/health").json()["status"] == "ok"
        finally:
            del os.environ["FAKE_KEY"]


def test_the_gateway_never_imports_torch() -> None:
    code = (
        "import sys, memserve.cli, memserve.gateway.app, memserve.pool.pool, memserve.config; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
