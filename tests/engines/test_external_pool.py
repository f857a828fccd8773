"""The stand-in vLLM under the real pool and gateway: a request streamed token by token, kill -9 and the restart,
eviction, the watchdog, and usage and metrics for what an external server served.

The pool plans the tiny demo model for a cpu-only test host and the spawner turns the plan into a vLLM one
(``conftest.as_vllm``): until the vLLM rungs are wired into the planner, that is how a plan with runner
``vllm`` reaches the pool. Everything after the plan is real: the spawner's dispatch, the process, the port,
the ledger, the watchdog's samples of the stand-in's process tree, and the gateway's hot path to it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from memserve.config import Settings
from memserve.engines.fit import fit_result
from memserve.gateway.app import create_app
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.pool.pool import ModelPool
from tests.engines.conftest import vllm_spawner
from tests.gateway.test_gateway_process import HEADROOM, chat, host, local, ps, room_for_one, settings_for
from tests.serving import serve_app

MiB, GiB = 1 << 20, 1 << 30


def stand_in_pids() -> list[int]:
    """The stand-in vLLM processes this test process started (children at any depth), zombies aside."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "fake_vllm.py" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


@contextmanager
def gateway(
    settings: Settings, inventory: Inventory, run_dir: Path, started: list[PlanFile] | None = None
) -> Iterator[tuple[str, ModelPool]]:
    pool = ModelPool(settings, inventory, spawner=vllm_spawner(run_dir, started=started))
    with serve_app(create_app(settings, pool), lifespan=True) as origin:
        yield origin, pool
    assert not stand_in_pids(), "the gateway left external servers behind"


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120  # a bound for a busy machine, not a race: each check is a real state
    while not condition():
        assert time.monotonic() < deadline, f"waited 120 s for {what}"
        time.sleep(0.05)


def row(origin: str, name: str) -> dict[str, Any]:
    return next(r for r in ps(origin)["models"] if r["name"] == name)


def test_a_stream_crosses_the_gateway_token_by_token_and_is_counted(
    tmp_path: Path, tiny_model_dir: Path, fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold = tmp_path / "release"
    monkeypatch.setenv("FAKE_VLLM_HOLD_FILE", str(hold))
    started: list[PlanFile] = []
    settings = settings_for(tmp_path, [local("demo", tiny_model_dir)], metrics_public=True)
    with gateway(settings, host(4 * GiB), tmp_path, started) as (origin, pool):
        body = {"model": "demo", "prompt": "once", "max_tokens": 5, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{origin}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 1:  # the first token is here while the stand-in holds the rest
                    assert json.loads(line[6:])["choices"][0]["text"] and not hold.exists()
                    hold.touch()
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines if line.startswith("data: {")]
        assert "".join(texts).split() == ["one", "two", "three", "four", "five"] and lines[-1] == "data: [DONE]"

        answer = chat(origin, "demo")
        assert answer.status_code == 200, answer.text
        model = row(origin, "demo")
        assert model["state"] == "ready" and model["pid"] in stand_in_pids()
        assert [plan.plan.runner for plan in started] == ["vllm"]
        ready = next(e for e in pool.events if e["event"] == "ready")
        assert 0 < ready["measured_bytes"]["cpu"] < model["devices"]["cpu"]["reserved_bytes"]  # its tree's RSS

        def counted() -> float:  # a request is counted as its exchange ends, which may be just after its last byte
            metrics = httpx.get(f"{origin}/metrics", timeout=10).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("memserve_requests_total{") and 'model="demo"' in line
            )

        until(lambda: counted() == 2, "/metrics to count both requests")

        def usage() -> int:
            groups = httpx.get(f"{origin}/api/usage", params={"group_by": "model"}, timeout=10).json()
            return sum(g["requests"] for g in groups["rows"] if g["model"] == "demo")

        until(lambda: usage() == 2, "two usage rows for demo")


def test_kill_9_of_the_server_is_seen_and_the_next_request_starts_it_again(
    tmp_path: Path, tiny_model_dir: Path, fake_vllm: str
) -> None:
    settings = settings_for(tmp_path, [local("demo", tiny_model_dir)])
    with gateway(settings, host(4 * GiB), tmp_path) as (origin, pool):
        assert chat(origin, "demo").status_code == 200
        pid = row(origin, "demo")["pid"]
        os.kill(pid, signal.SIGKILL)
        until(lambda: row(origin, "demo")["state"] == "failed", "the pool to see the kill")
        assert "SIGKILL" in row(origin, "demo")["reason"]
        again = chat(origin, "demo")
        assert again.status_code == 200, again.text
        assert row(origin, "demo")["state"] == "ready" and row(origin, "demo")["pid"] != pid
        assert [e["event"] for e in pool.events].count("crash") == 1


def test_loading_a_second_model_evicts_the_idle_external_one(
    tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path, fake_vllm: str
) -> None:
    budget = room_for_one(tiny_model_dir, tiny_qwen_dir)
    settings = settings_for(tmp_path, [local("llama", tiny_model_dir), local("qwen", tiny_qwen_dir)])
    with gateway(settings, host(budget), tmp_path) as (origin, pool):
        assert chat(origin, "llama").status_code == 200
        first = row(origin, "llama")["pid"]
        assert chat(origin, "qwen").status_code == 200
        assert [r["name"] for r in ps(origin)["models"]] == ["qwen"]
        assert first not in stand_in_pids()  # stopped, not left running beside the books
        assert [e["model"] for e in pool.events if e["event"] == "evict"] == ["llama"]


def test_the_watchdog_kills_an_external_server_past_its_plan(
    tmp_path: Path, tiny_model_dir: Path, fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = fit_result(str(tiny_model_dir), context=256, concurrency=2, inventory=host(8 * GiB))[2].plan
    assert plan is not None
    grow = plan.reserved_bytes["cpu"] + 512 * MiB  # past the reservation and any tolerance
    monkeypatch.setenv("FAKE_VLLM_GROW_MIB", str(grow // MiB))
    settings = settings_for(tmp_path, [local("demo", tiny_model_dir)], watchdog_tolerance_min_bytes=64 * MiB)
    with gateway(settings, host(4 * GiB), tmp_path) as (origin, pool):
        pid = None

        def killed() -> bool:
            return any(e["event"] == "watchdog_kill" for e in pool.events)

        answer = chat(origin, "demo")  # it grows while answering; the answer may or may not get out first
        assert answer.status_code in (200, 502), answer.text
        pid = next(e["pid"] for e in pool.events if e["event"] == "ready")
        until(killed, "the watchdog's kill")
        kill = next(e for e in pool.events if e["event"] == "watchdog_kill")
        assert kill["pid"] == pid and kill["measured_bytes"] > kill["limit_bytes"]
        until(lambda: row(origin, "demo")["state"] == "failed", "the model to be marked failed")
        assert "stopped by the watchdog" in row(origin, "demo")["reason"]
        assert pid not in stand_in_pids()


def test_on_a_gpu_host_where_vllm_is_installed_the_pool_plans_and_starts_vllm(
    tmp_path: Path, tiny_model_dir: Path, fake_vllm: str
) -> None:
    """No spawner of the test's own: the planner chooses the vLLM rung on a host with a GPU, and the pool's own
    spawner starts the stand-in with vLLM's share of that GPU's total."""
    gpu = Device("cuda:0", "cuda", 24 * GiB, 23 * GiB, headroom_bytes=HEADROOM, compute_capability=(8, 9))
    cpu = Device("cpu", "cpu", 24 * GiB, 20 * GiB, budget_bytes=8 * GiB, headroom_bytes=HEADROOM)
    settings = settings_for(tmp_path, [local("demo", tiny_model_dir)])
    pool = ModelPool(settings, Inventory((cpu, gpu)))
    with serve_app(create_app(settings, pool), lifespan=True) as origin:
        answer = chat(origin, "demo")
        assert answer.status_code == 200, answer.text
        loaded = pool.entries["demo"].plan
        assert loaded is not None and (loaded.runner, loaded.rung) == ("vllm", "vllm")
        assert row(origin, "demo")["pid"] in stand_in_pids()
        assert set(row(origin, "demo")["devices"]) == {"cpu", "cuda:0"}
    assert not stand_in_pids()
