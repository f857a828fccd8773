"""ExternalRunner against the stand-in vLLM (a real process on a real port): readiness, the faults a server we
did not write can have, and what each leaves in the error a person reads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Collection
from pathlib import Path

import httpx
import psutil
import pytest

from memserve.engines import vllm
from memserve.errors import RunnerFailed
from memserve.memory.fit import PlanFile
from memserve.net import free_port
from memserve.pool import external
from memserve.pool.external import LOG_TAIL_BYTES, LOG_TAIL_LINES, ExternalRunner, LogTail, start_external
from memserve.pool.runner_process import process_spawner
from memserve.pool.runner_transport import RunnerTransport
from tests.engines.conftest import FAKE_GPU_TOTAL_BYTES, as_vllm
from tests.pool.fake_runner import plan_file

MiB, GiB = 1 << 20, 1 << 30


def launch() -> PlanFile:
    return as_vllm(plan_file("/models/m", reserved_bytes={"cpu": 512 * MiB}))


async def started(name: str = "m") -> ExternalRunner:
    return await start_external(name, launch(), gpu_total_bytes=lambda: {"cuda:0": FAKE_GPU_TOTAL_BYTES})


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ready_once_health_and_models_answer_then_serves_and_stops(
    fake_vllm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args_file = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_VLLM_ARGS_FILE", str(args_file))
    monkeypatch.setenv("MEMSERVE_ADMIN_KEY", "sk-admin")  # the gateway's keys, and a server key that would lock
    monkeypatch.setenv("VLLM_API_KEY", "sk-vllm")  # the gateway out of its own runner, never reach the server

    async def scenario() -> None:
        runner = await started("demo")
        try:
            assert await runner.wait_ready(60) is None
            assert runner.phase == "ready" and runner.last_stats is None
            answer = await runner.client.post(
                "/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"].startswith("one two")
            sample = runner.sample_memory()
            assert 0 < sample["cpu"] < 512 * MiB  # the stand-in's own RSS, measured over its tree
            pid = runner.pid
            assert pid is not None
        finally:
            await runner.stop(grace_seconds=30)
        assert runner.returncode == 0 and gone(pid)  # SIGTERM was enough: it exits on its own

    asyncio.run(scenario())
    args = json.loads(args_file.read_text())  # the argv the plan gave, as the stand-in parsed it
    assert args["served_model_name"] == ["demo"] and args["host"] == "127.0.0.1"
    assert args["max_model_len"] == 2048 and args["max_num_seqs"] == 2 and args["dtype"] == "bfloat16"
    assert "MEMSERVE_ADMIN_KEY" not in args["environ"] and "VLLM_API_KEY" not in args["environ"]
    assert "PATH" in args["environ"]
    assert args["multiproc"] == "spawn"  # its workers exec, so the watchdog counts their memory


def test_never_ready_is_killed_after_the_load_timeout_with_its_last_log_lines(
    fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_NEVER_READY", "1")

    async def scenario() -> None:
        runner = await started()
        with pytest.raises(RunnerFailed) as failed:
            await runner.wait_ready(3)
        assert runner.returncode == -signal.SIGKILL
        message = failed.value.message
        assert "was not ready" in message and "was killed" in message and "load_timeout_seconds" in message
        assert "still loading weights, step" in message  # its own words, from the log tail
        await runner.stop()

    asyncio.run(scenario())


def test_a_server_on_another_port_than_asked_is_killed_after_the_load_timeout(
    fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_OTHER_PORT", "1")

    async def scenario() -> None:
        runner = await started()
        with pytest.raises(RunnerFailed, match=f"was not ready on 127.0.0.1:{runner.port}"):
            await runner.wait_ready(3)
        assert runner.returncode == -signal.SIGKILL
        await runner.stop()

    asyncio.run(scenario())


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace(
    fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_IGNORE_SIGTERM", "1")

    async def scenario() -> None:
        runner = await started()
        await runner.wait_ready(60)
        pid = runner.pid
        assert pid is not None
        await runner.stop(grace_seconds=0.5)
        assert runner.returncode == -signal.SIGKILL and gone(pid)

    asyncio.run(scenario())


def test_a_log_flood_is_read_as_it_comes_and_only_its_tail_is_kept(
    fake_vllm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "FAKE_VLLM_LOG_MIB", "8"
    )  # far past a pipe's 64 KiB: a server blocked on a full pipe never answers

    async def scenario() -> None:
        runner = await started()
        try:
            await runner.wait_ready(120)
            lines = runner.log.lines()
            assert runner.log.total_bytes >= 8 * MiB  # all of it was read
            assert len(lines) <= LOG_TAIL_LINES and sum(map(len, lines)) <= LOG_TAIL_BYTES
            assert lines[-1].startswith("INFO 11-30 12:00:00 [fake_vllm.py:1] xxx")
        finally:
            await runner.stop()

    asyncio.run(scenario())


def test_the_whole_group_goes_when_the_leader_dies(fake_vllm: str, tmp_path: Path) -> None:
    """A helper the server started (vLLM's engine core) must not outlive it, nor keep its pipes open."""
    script = tmp_path / "leader.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )

    async def scenario() -> None:
        runner = ExternalRunner("m", launch(), [sys.executable, str(script)], port=free_port())
        await runner.start()
        assert runner.pid is not None
        while not runner.log.lines():
            await asyncio.sleep(0.01)
        helper = int(runner.log.lines()[0])
        os.kill(runner.pid, signal.SIGKILL)
        assert await asyncio.wait_for(runner.wait_exit(), 30) == -signal.SIGKILL
        assert "killed by SIGKILL" in runner.exit_reason()
        for _ in range(500):  # the kill is asynchronous: the helper is reaped by init soon after
            if gone(helper):
                break
            await asyncio.sleep(0.01)
        assert gone(helper)
        await runner.stop()

    asyncio.run(scenario())


def test_an_exit_while_loading_says_why_with_its_log(fake_vllm: str) -> None:
    async def scenario() -> None:
        argv = [sys.executable, "-c", "import sys; print('CUDA out of memory', file=sys.stderr); sys.exit(3)"]
        runner = ExternalRunner("m", launch(), argv, port=free_port())
        await runner.start()
        with pytest.raises(RunnerFailed, match=r"ended while loading: exited with code 3.*CUDA out of memory"):
            await runner.wait_ready(60)
        await runner.stop()

    asyncio.run(scenario())


def test_a_missing_engine_is_an_error_naming_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSERVE_VLLM_COMMAND", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    spawn = process_spawner(Path("/nonexistent"), gpu_total_bytes=dict)
    with pytest.raises(RunnerFailed, match=r"pip install 'memserve\[vllm\]' on a CUDA machine"):
        asyncio.run(spawn("m", launch(), lambda event: None))


def test_an_engine_module_that_is_not_there_is_named_with_its_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(external.ENGINE_MODULES, "llama.cpp", "not_written_yet")
    with pytest.raises(RunnerFailed, match=r"no llama.cpp engine .*llama-server on PATH"):
        external.engine_module("llama.cpp")


def test_log_tail_keeps_the_last_lines_within_its_bounds() -> None:
    tail = LogTail(max_lines=3, max_bytes=10)
    tail.feed(b"one\ntwo\nthr")
    tail.feed(b"ee\nfour\n" + b"x" * 5000)
    tail.close()
    assert tail.lines()[-1] == "x" * 2048  # a line too long is cut, never kept whole
    assert len(tail.lines()) == 1  # the bytes bound drops the older ones
    tail = LogTail(max_lines=3)
    tail.feed(b"a\nb\nc\nd\n")
    assert tail.lines() == ["b", "c", "d"] and tail.total_bytes == 8


def test_the_transport_speaks_tcp_as_it_speaks_unix_sockets(fake_vllm: str) -> None:
    async def scenario() -> None:
        runner = await started("demo")
        try:
            await runner.wait_ready(60)
            transport = RunnerTransport(address=("127.0.0.1", runner.port))
            async with httpx.AsyncClient(base_url="http://runner/v1", transport=transport) as client:
                body = {"model": "demo", "prompt": "x", "max_tokens": 3, "stream": True}
                async with client.stream("POST", "/completions", json=body) as stream:
                    events = [line async for line in stream.aiter_lines() if line.startswith("data:")]
                assert events[-1] == "data: [DONE]" and len(events) >= 4
                for _ in range(3):  # the kept-alive connection is reused
                    assert (await client.get("/models")).status_code == 200
        finally:
            await runner.stop()
        with pytest.raises(ValueError, match="either a socket path or"):
            RunnerTransport()

    asyncio.run(scenario())


def test_a_server_that_serves_another_name_is_stopped_with_what_it_serves(fake_vllm: str) -> None:
    async def scenario() -> None:
        port = free_port()
        argv = vllm.arguments(
            "other", launch(), host="127.0.0.1", port=port, total_bytes={"cuda:0": FAKE_GPU_TOTAL_BYTES}
        )
        runner = ExternalRunner("m", launch(), argv, port=port)
        await runner.start()
        with pytest.raises(RunnerFailed, match=r"serves \['other'\] instead of 'm'"):
            await runner.wait_ready(60)
        assert runner.returncode == -signal.SIGKILL
        await runner.stop()

    asyncio.run(scenario())


def test_its_gpu_memory_is_what_nvml_says_its_process_tree_holds(fake_vllm: str) -> None:
    asked: list[set[int]] = []

    def nvml(pids: Collection[int]) -> dict[str, int]:  # what GpuProcessMemory answers on a GPU host
        asked.append(set(pids))
        return {"cuda:0": 3 * GiB}

    async def scenario() -> None:
        port = free_port()
        argv = vllm.arguments("m", launch(), host="127.0.0.1", port=port, total_bytes={"cuda:0": FAKE_GPU_TOTAL_BYTES})
        runner = ExternalRunner("m", launch(), argv, port=port, gpu_memory=nvml)
        await runner.start()
        try:
            await runner.wait_ready(60)
            sample = runner.sample_memory()
            assert sample["cuda:0"] == 3 * GiB and sample["cpu"] > 0
            assert runner.pid in asked[-1]
        finally:
            await runner.stop()
        assert runner.sample_memory() == {}  # nothing is measured of a server that is gone

    asyncio.run(scenario())
