"""The stand-in vLLM for the external-runner tests, and plans that send the pool to it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from memserve.checkpoint.demo_gguf import convert_demo_checkpoint
from memserve.engines.llamacpp import executable
from memserve.errors import RunnerFailed
from memserve.memory.estimate import DeviceNeed, GiB
from memserve.memory.fit import PlanFile
from memserve.pool.runner_process import RunnerHandle, Spawner, process_spawner
from memserve.wire.events import RunnerEvent

FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
FAKE_GPU_TOTAL_BYTES = 80 * GiB
FAKE_GPU_NEED = DeviceNeed(weights_bytes=GiB, kv_cache_bytes=GiB, activation_bytes=GiB // 2, runtime_bytes=GiB)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``MEMSERVE_VLLM_COMMAND`` pointing at the stand-in; yields the command."""
    command = f"{sys.executable} {FAKE_VLLM}"
    monkeypatch.setenv("MEMSERVE_VLLM_COMMAND", command)
    for name in (
        "FAKE_VLLM_HOLD_MIB",
        "FAKE_VLLM_GROW_MIB",
        "FAKE_VLLM_NEVER_READY",
        "FAKE_VLLM_IGNORE_SIGTERM",
        "FAKE_VLLM_OTHER_PORT",
        "FAKE_VLLM_LOG_MIB",
        "FAKE_VLLM_HOLD_FILE",
        "FAKE_VLLM_ARGS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    yield command


def as_vllm(launch: PlanFile) -> PlanFile:
    """``launch`` served by vLLM: runner ``vllm``, and a GPU beside its host memory (its reservation too).

    The pool plans the tiny demo model for a cpu-only test host, as the transformers runner would; this turns
    that plan into the one the vLLM rung gives on a GPU host, so the real pool, ledger and watchdog run it. The
    host RAM reservation (what the watchdog holds the stand-in's RSS to) is the pool's own.
    """
    plan = replace(launch.plan, runner="vllm", devices={**launch.plan.devices, "cuda:0": FAKE_GPU_NEED})
    reserved = {**launch.reservation_bytes, "cuda:0": FAKE_GPU_NEED.total_bytes}
    return replace(launch, plan=plan, reserved_bytes=reserved)


def vllm_spawner(
    run_dir: Path, env: Mapping[str, str] | None = None, *, started: list[PlanFile] | None = None
) -> Spawner:
    """The real spawner, given vLLM plans (``as_vllm``) and a fake GPU total; what it started goes in ``started``."""
    real = process_spawner(run_dir, env, gpu_total_bytes=lambda: {"cuda:0": FAKE_GPU_TOTAL_BYTES})

    async def spawn(name: str, launch: PlanFile, on_event: Callable[[RunnerEvent], None]) -> RunnerHandle:
        vllm = as_vllm(launch)
        if started is not None:
            started.append(vllm)
        return await real(name, vllm, on_event)

    return spawn


@pytest.fixture(scope="module")
def command() -> list[str]:
    """llama-server's command; skipped without it on a developer's machine, failed under CI."""
    try:
        return executable()
    except RunnerFailed as exc:
        message = exc.message
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test (.ci/run builds it)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model as one f32 GGUF file."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    convert_demo_checkpoint(tiny_model_dir, path, gguf_type="f32")
    return path
