"""The ModelPool with scripted runners: no processes, no files, no torch.

Each test builds a pool over an injected inventory (a CPU budget that fits one or two models, or a
fake GPU with bitsandbytes), facts built in memory from real model shapes, a ``FakeSpawner`` and a
scripted host memory, then drives it on an event loop with virtual time (``virtual_time.py``): keep-alive
timers, backoffs, watchdog intervals (10 ms here) and deadlines pass without real waiting. Waits are on the
runners' scripts (``make_ready``, ``exit``) and on the pool's own state, and every scenario runs under a
(virtual) timeout so a hang fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from memserve.checkpoint.facts import CheckpointFacts, facts_from
from memserve.cli.manage import PsReply
from memserve.config import ModelConfig, Settings
from memserve.errors import InsufficientMemory, InvalidArgument, MemoryBusy, ModelNotFound, Overloaded, RunnerFailed
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import Plan
from memserve.pool import pool as pool_module
from memserve.pool.eviction import Resident
from memserve.pool.ledger import Ledger
from memserve.pool.pool import ModelPool, backoff_seconds, compatible, watchdog_limit_bytes
from memserve.units import format_bytes
from memserve.wire.events import Ready
from tests.fakes import LLAMA3_8B, QWEN2_05B, GiB, tensors_for
from tests.pool.fake_runner import FakeSpawner, RunnerScript
from tests.pool.virtual_time import run_virtual

MiB = 1024**2
HEADROOM_BYTES = 512 * MiB
PLENTY_BYTES = 64 * GiB
# a Qwen2-0.5B-shaped model plans ~1.4 GiB on CPU at context 2048 × 1: this budget fits one, not two
ONE_MODEL_GIB = 2.5
TWO_MODELS_GIB = 8.0
SCENARIO_TIMEOUT_SECONDS = 5.0
GATED = RunnerScript(ready_after_seconds=None)  # loads until the test calls make_ready() or exit()

ROW_KEYS = {
    "name",
    "state",
    "pid",
    "source",
    "adapters",
    "rung",
    "runner",
    "dtype",
    "quantization",
    "context_tokens",
    "concurrency",
    "devices",
    "leases",
    "queued",
    "pinned",
    "keep_alive_seconds",
    "expires_at",
    "load_seconds",
    "reason",
    "socket",
}


# ------------------------------------------------------------------------------------------- the world


@functools.cache
def _facts(source: str) -> CheckpointFacts:
    config = LLAMA3_8B if "big" in source else QWEN2_05B
    return facts_from(config, tensors_for(config), source=source)


def read_facts(source: str) -> CheckpointFacts:
    """The pool's facts_reader: real shapes, no files. Sources with "big" are Llama-3-8B, others Qwen2-0.5B."""
    return _facts(source)


def model(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {"name": name, "source": f"mem://{name}", "context_tokens": 2048, "concurrency": 1, **fields}
    )


def cpu_host(usable_gib: float) -> Inventory:
    """A 64 GiB host with a budget that leaves ``usable_gib`` after the headroom."""
    budget = int(usable_gib * GiB) + HEADROOM_BYTES
    return Inventory((Device("cpu", "cpu", 64 * GiB, 60 * GiB, budget_bytes=budget, headroom_bytes=HEADROOM_BYTES),))


GPU_HOST = Inventory(
    (
        Device("cpu", "cpu", 64 * GiB, 60 * GiB, headroom_bytes=HEADROOM_BYTES),
        Device(
            "cuda:0",
            "cuda",
            24 * GiB,
            24 * GiB - 300 * MiB,
            headroom_bytes=HEADROOM_BYTES,
            description="NVIDIA L4",
            compute_capability=(8, 9),
        ),
    ),
    bitsandbytes=True,
)


@dataclass
class HostMemory:
    """The pool's host_available_bytes: scripted samples, one per watchdog look, then plenty."""

    samples: list[int] = field(default_factory=list)

    def __call__(self) -> int:
        return self.samples.pop(0) if self.samples else PLENTY_BYTES


@dataclass
class Harness:
    pool: ModelPool
    spawner: FakeSpawner
    host: HostMemory

    def state(self, name: str) -> str:
        return self.pool.entries[name].state

    def events(self, kind: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        return [
            e.to_json()
            for e in self.pool.history
            if (kind is None or e.kind == kind) and (name is None or e.model == name)
        ]

    def kinds(self, name: str | None = None) -> list[str]:
        return [e["event"] for e in self.events(name=name)]


@contextlib.asynccontextmanager
async def running_pool(
    tmp_path: Path,
    models: Sequence[ModelConfig],
    *,
    inventory: Inventory | None = None,
    spawner: FakeSpawner | None = None,
    start: bool = False,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A pool with fast watchdogs and a 60 s keep-alive unless told otherwise; shut down on the way out."""
    values: dict[str, Any] = {
        "keep_alive_seconds": 60,
        "memory_wait_seconds": 0.2,
        "load_timeout_seconds": 5,
        "watchdog_interval_seconds": 0.01,
        "watchdog_loading_interval_seconds": 0.01,
        **settings,
    }
    spawner, host = spawner or FakeSpawner(), HostMemory()
    pool = ModelPool(
        Settings(models=list(models), data_dir=tmp_path, **values),
        inventory or cpu_host(TWO_MODELS_GIB),
        spawner=spawner,
        host_available_bytes=host,
        facts_reader=read_facts,
    )
    harness = Harness(pool, spawner, host)
    if start:
        await harness.pool.start()
    try:
        yield harness
    finally:
        await harness.pool.shutdown()


def ready_at(peak_rss_bytes: int) -> Ready:
    """A runner's ready report with its peak RSS."""
    return Ready("m", "continuous-batching", {"cpu": {"peak_rss_bytes": peak_rss_bytes}})


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one scenario on a fresh loop; a hang fails after SCENARIO_TIMEOUT_SECONDS instead of blocking."""

    async def bounded() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT_SECONDS):
            await scenario()

    run_virtual(bounded())


async def until(predicate: Callable[[], bool], what: str, timeout_seconds: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        await asyncio.sleep(0.002)


async def use(pool: ModelPool, name: str, **kwargs: Any) -> None:
    """One request that ends at once: the model is loaded and left idle."""
    (await pool.acquire(name, **kwargs)).release()


def never_over_usable(ledger: Ledger) -> None:
    """Make every reservation check that no device holds more than it may hand out."""
    reserve = ledger.reserve

    def checked(name: str, reserved_bytes: Mapping[str, int]) -> None:
        reserve(name, reserved_bytes)
        usable = ledger.usable_bytes()
        for device, held in ledger.held_bytes().items():
            assert held <= usable.get(device, 0), f"{device}: held {held} > usable {usable.get(device, 0)}"

    ledger.reserve = checked  # type: ignore[method-assign]


def scaled_backoff(monkeypatch: pytest.MonkeyPatch, factor: float = 1 / 20) -> None:
    """The pool's backoff, shrunk (2 s → 0.1 s) so that waiting on it is measurable but quick."""
    monkeypatch.setattr(pool_module, "backoff_seconds", lambda failures: backoff_seconds(failures) * factor)


# ------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("failures", "seconds"), [(0, 0.0), (1, 0.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (50, 30.0)]
)
def test_backoff_doubles_from_the_second_failure_up_to_30_s(failures: int, seconds: float) -> None:
    assert backoff_seconds(failures) == seconds


@pytest.mark.parametrize(
    ("context_tokens", "concurrency", "expected"),
    [
        (None, None, True),  # plain requests: sampling options never need a reload
        (2048, None, True),
        (1024, 1, True),  # a smaller context is served by the loaded runner
        (2048, 2, True),
        (4096, None, False),  # a larger context needs a new plan
        (None, 4, False),  # so does more concurrency
        (1024, 3, False),
    ],
)
def test_compatible(context_tokens: int | None, concurrency: int | None, expected: bool) -> None:
    loaded = Plan(
        "cpu", "bfloat16", "none", context_tokens=2048, concurrency=2, max_batch_tokens=2048, devices={}, device_map={}
    )
    assert compatible(loaded, context_tokens=context_tokens, concurrency=concurrency) is expected


@pytest.mark.parametrize(
    ("reserved", "tolerance", "minimum", "limit"),
    [
        (10 * GiB, 0.10, 128 * MiB, 11 * GiB),  # the fraction is larger
        (GiB, 0.10, 128 * MiB, GiB + 128 * MiB),  # the floor is larger
        (GiB, 0.0, 0, GiB),
        (0, 0.10, 128 * MiB, 128 * MiB),  # an unplanned device still gets the floor
    ],
)
def test_watchdog_limit(reserved: int, tolerance: float, minimum: int, limit: int) -> None:
    assert watchdog_limit_bytes(reserved, tolerance, minimum) == limit


# ------------------------------------------------------------------------------------- single flight, leases


def test_concurrent_acquires_share_one_load(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", concurrency=2)], spawner=FakeSpawner(GATED)) as h:
            tasks = [asyncio.create_task(h.pool.acquire("a")) for _ in range(6)]
            await until(lambda: len(h.spawner.spawned) == 1 and h.pool.entries["a"].waiting == 6, "six waiting")
            assert h.pool.row(h.pool.entries["a"])["queued"] == 6
            runner = h.spawner.spawned[0]
            runner.make_ready()
            leases = await asyncio.gather(*tasks)
            assert len(h.spawner.spawned) == 1
            assert h.kinds("a").count("load") == 1
            assert all(lease.client is runner.client for lease in leases)
            assert (h.pool.entries["a"].leases, h.pool.entries["a"].waiting) == (6, 0)
            for lease in leases:
                lease.release()
            assert h.pool.entries["a"].leases == 0

    run(scenario)


def test_a_models_engine_reaches_its_runners_plan(tmp_path: Path) -> None:
    async def scenario() -> None:
        configs = [model("a"), model("b", engine="generate")]
        async with running_pool(tmp_path, configs, spawner=FakeSpawner()) as h:
            for name in ("a", "b"):
                (await h.pool.acquire(name)).release()
            plans = {r.name: r.launch.plan for r in h.spawner.spawned}
            assert (plans["a"].engine, plans["b"].engine) == ("continuous-batching", "generate")
            # planned with its own cache and runtime: less than the same model on the paged engine
            assert plans["b"].devices["cpu"].total_bytes < plans["a"].devices["cpu"].total_bytes

    run(scenario)


def test_states_follow_the_runner_phases(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(GATED)) as h:
            task = asyncio.create_task(h.pool.acquire("a"))
            await until(lambda: len(h.spawner.spawned) == 1, "the spawn")
            runner = h.spawner.spawned[0]
            seen = [h.state("a")]
            for phase in ("resolve", "map", "fault_in", "warm_up"):
                runner.emit_phase(phase)
                seen.append(h.state("a"))
            assert seen == ["starting", "loading", "loading", "warming", "warming"]
            runner.make_ready()
            lease = await task
            assert h.state("a") == "ready"
            assert [e["phase"] for e in h.events("phase", "a")] == ["resolve", "map", "fault_in", "warm_up"]
            assert h.kinds("a")[-1] == "ready"
            lease.release()

    run(scenario)


def test_release_is_idempotent_and_expiry_waits_for_the_last_lease(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", concurrency=2)]) as h:
            first, second = await h.pool.acquire("a"), await h.pool.acquire("a")
            entry = h.pool.entries["a"]
            assert entry.leases == 2 and entry.expires_at is None
            first.release()
            first.release()
            assert entry.leases == 1 and entry.expires_at is None
            assert h.pool.row(entry)["expires_at"] is None
            second.release()
            second.release()
            assert entry.leases == 0
            expires_at = h.pool.row(entry)["expires_at"]
            assert expires_at is not None and 55 < expires_at - time.time() <= 60

    run(scenario)


def test_unknown_model_is_not_found_with_close_names(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("qwen-small")]) as h:
            with pytest.raises(ModelNotFound, match="did you mean qwen-small") as info:
                await h.pool.acquire("qwen-smal")
            assert info.value.status_code == 404
            assert h.spawner.spawned == []

    run(scenario)


# ------------------------------------------------------------------------------------------------ keep-alive


def test_idle_model_expires_after_its_keep_alive_but_not_while_leased(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", keep_alive_seconds=0.05)]) as h:
            lease = await h.pool.acquire("a")
            await asyncio.sleep(0.2)  # four keep-alives while leased
            runner = h.spawner.spawned[0]
            assert h.state("a") == "ready" and runner.stop_calls == 0
            lease.release()
            await until(lambda: h.state("a") == "stopped", "the keep-alive expiry")
            assert runner.stop_calls == 1
            assert h.pool.ledger.names() == []
            assert "keep_alive" in h.events("stopped", "a")[-1]["reason"]
            assert h.pool.ps()["models"] == []

    run(scenario)


def test_request_keep_alive_overrides_the_models(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a"), model("b")]) as h:  # both 60 s from the server
            await use(h.pool, "a", keep_alive_seconds=0.05)
            await use(h.pool, "b", keep_alive_seconds=-1)  # Ollama's "forever"
            await until(lambda: h.state("a") == "stopped", "a's 50 ms keep-alive")
            assert h.state("b") == "ready"
            row = h.pool.row(h.pool.entries["b"])
            assert row["keep_alive_seconds"] is None and row["expires_at"] is None

    run(scenario)


def test_pinned_and_forever_models_never_expire_and_zero_unloads_when_idle(tmp_path: Path) -> None:
    async def scenario() -> None:
        models = [
            model("pinned", pinned=True, keep_alive_seconds=0.01),
            model("forever", keep_alive_seconds=-1),
            model("zero", keep_alive_seconds=0),
        ]
        async with running_pool(tmp_path, models) as h:
            for name in ("pinned", "forever", "zero"):
                await use(h.pool, name)
            await until(lambda: h.state("zero") == "stopped", "keep_alive 0 to unload")
            await asyncio.sleep(0.1)  # ten of pinned's keep-alives
            for name in ("pinned", "forever"):
                entry = h.pool.entries[name]
                assert entry.state == "ready" and entry.expires_at == math.inf
                assert h.pool.row(entry)["expires_at"] is None
                assert h.spawner.runners(name)[0].stop_calls == 0
            assert h.pool.row(h.pool.entries["forever"])["keep_alive_seconds"] is None

    run(scenario)


# -------------------------------------------------------------------------------------------------- eviction


def test_idle_model_is_evicted_to_make_room(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a"), model("b")], inventory=cpu_host(ONE_MODEL_GIB)) as h:
            never_over_usable(h.pool.ledger)
            await use(h.pool, "a")
            need, usable = h.pool.ledger.held("a")["cpu"], h.pool.ledger.usable_bytes()["cpu"]
            assert need <= usable < 2 * need  # the premise: one fits, two do not
            lease = await h.pool.acquire("b")
            assert h.spawner.journal == [("spawn", "a"), ("stop", "a"), ("spawn", "b")]
            assert h.state("a") == "stopped" and "evicted to make room for b" in str(h.pool.entries["a"].reason)
            assert [e["model"] for e in h.events("evict")] == ["a"]
            assert h.pool.ledger.names() == ["b"]
            lease.release()

    run(scenario)


def test_leased_model_is_never_evicted_and_the_newcomer_gets_memory_busy(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(
            tmp_path, [model("a"), model("b")], inventory=cpu_host(ONE_MODEL_GIB), memory_wait_seconds=0.1
        ) as h:
            lease = await h.pool.acquire("a")
            with pytest.raises(MemoryBusy) as info:
                await h.pool.acquire("b")
            assert info.value.status_code == 503 and info.value.retry_after_seconds > 0
            assert "a (ready, 1 leases)" in info.value.message and "memory_wait_seconds" in info.value.message
            assert h.state("a") == "ready" and h.spawner.runners("a")[0].stop_calls == 0
            assert h.spawner.runners("b") == []
            assert h.state("b") == "stopped" and h.events("refused", "b")[0]["code"] == "memory_busy"
            assert h.pool.ledger.names() == ["a"]
            lease.release()

    run(scenario)


def test_waiting_load_proceeds_when_the_busy_model_is_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        waiting_for_memory = asyncio.Event()
        choose = pool_module.choose_evictions

        def spy(need: Mapping[str, int], free: Mapping[str, int], residents: Sequence[Resident]) -> list[str] | None:
            victims = choose(need, free, residents)
            if victims is None:
                waiting_for_memory.set()
            return victims

        monkeypatch.setattr(pool_module, "choose_evictions", spy)
        async with running_pool(
            tmp_path, [model("a"), model("b")], inventory=cpu_host(ONE_MODEL_GIB), memory_wait_seconds=4
        ) as h:
            never_over_usable(h.pool.ledger)
            lease_a = await h.pool.acquire("a")
            task_b = asyncio.create_task(h.pool.acquire("b"))
            await waiting_for_memory.wait()
            assert not task_b.done() and h.spawner.journal == [("spawn", "a")]
            lease_a.release()
            lease_b = await task_b
            assert h.spawner.journal == [("spawn", "a"), ("stop", "a"), ("spawn", "b")]
            assert h.state("a") == "stopped" and h.state("b") == "ready"
            lease_b.release()

    run(scenario)


def test_model_larger_than_the_whole_capacity_is_refused_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(
            tmp_path, [model("big")], inventory=cpu_host(ONE_MODEL_GIB), memory_wait_seconds=4
        ) as h:
            with pytest.raises(InsufficientMemory) as info:
                await h.pool.acquire("big")
            message = info.value.message
            assert info.value.status_code == 507
            assert "'big'" in message and "closest is cpu-4bit: cpu needs 7" in message  # ~7.2 GiB for Llama-3-8B
            assert f"{format_bytes(int(ONE_MODEL_GIB * GiB))} usable" in message
            assert h.spawner.spawned == []
            assert h.state("big") == "stopped" and h.events("refused", "big")[0]["code"] == "insufficient_memory"

    run(scenario)


def test_pinned_models_leaving_too_little_room_refuse_without_waiting(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(
            tmp_path, [model("a", pinned=True), model("b")], inventory=cpu_host(ONE_MODEL_GIB), memory_wait_seconds=30
        ) as h:
            await use(h.pool, "a")
            with pytest.raises(InsufficientMemory) as info:
                await asyncio.wait_for(h.pool.acquire("b"), 2)  # far less than the 30 s memory wait
            assert info.value.status_code == 507
            assert "pinned models (a)" in info.value.message and "unpin" in info.value.message
            assert h.state("a") == "ready" and h.spawner.runners("a")[0].stop_calls == 0
            assert h.spawner.runners("b") == []

    run(scenario)


# ------------------------------------------------------------------------------------------------ backpressure


def test_overloaded_when_leases_and_waiting_reach_concurrency_plus_queue(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", concurrency=1, max_queue=1)], spawner=FakeSpawner(GATED)) as h:
            waiting = [asyncio.create_task(h.pool.acquire("a")) for _ in range(2)]
            await until(
                lambda: h.pool.entries["a"].waiting == 2 and len(h.spawner.spawned) == 1, "two waiting on the one load"
            )  # the spawn comes after planning, in its own task
            with pytest.raises(Overloaded) as info:
                await h.pool.acquire("a")
            assert info.value.status_code == 429 and info.value.retry_after_seconds > 0
            assert "max_queue" in info.value.message
            assert "0 requests in flight and 2 waiting, its limit of 2 (concurrency 1 + queue 1)" in info.value.message
            h.spawner.spawned[0].make_ready()
            first, second = await asyncio.gather(*waiting)
            with pytest.raises(Overloaded):
                await h.pool.acquire("a")  # two leases are the limit too
            first.release()
            third = await h.pool.acquire("a")
            assert h.pool.entries["a"].leases == 2 and len(h.spawner.spawned) == 1
            second.release()
            third.release()

    run(scenario)


# ----------------------------------------------------------------------------------------- crashes and backoff


def test_crash_marks_the_model_failed_frees_its_memory_and_the_next_request_restarts_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            await use(h.pool, "a")
            first = h.spawner.spawned[0]
            first.exit(-9)
            await until(lambda: h.state("a") == "failed", "the crash to be seen")
            reason = str(h.pool.entries["a"].reason)
            assert "SIGKILL" in reason and f"pid {first.pid}" in reason
            assert h.pool.ledger.names() == [] and h.pool.ledger.held("a") == {}
            [row] = h.pool.ps()["models"]
            assert row["state"] == "failed" and row["reason"] == reason and row["pid"] is None
            [crash] = h.events("crash", "a")
            assert crash["pid"] == first.pid and "SIGKILL" in crash["reason"]
            lease = await h.pool.acquire("a")
            second = h.spawner.spawned[1]
            assert len(h.spawner.spawned) == 2 and lease.client is second.client and second.pid != first.pid
            assert h.state("a") == "ready" and h.pool.ledger.names() == ["a"]
            assert h.events("backoff") == []  # the first restart is immediate
            lease.release()

    run(scenario)


def test_repeated_load_failures_back_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scaled_backoff(monkeypatch)
    broken = RunnerScript(fail_while_loading="RuntimeError: CUDA error: out of memory")

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            h.spawner.script("a", broken, broken)
            for _ in range(2):
                with pytest.raises(RunnerFailed, match="exited with code 1: RuntimeError: CUDA error") as info:
                    await h.pool.acquire("a")
                assert info.value.status_code == 502
            assert h.state("a") == "failed" and h.pool.ledger.names() == []
            asked = asyncio.get_running_loop().time()
            lease = await h.pool.acquire("a")
            assert [e["seconds"] for e in h.events("backoff", "a")] == [pytest.approx(0.1)]
            assert h.spawner.spawn_times[2] - asked >= 0.09  # the second restart waited out its backoff
            lifecycle = [k for k in h.kinds("a") if k in ("load", "load_failed", "backoff", "ready")]
            assert lifecycle == ["load", "load_failed", "load", "load_failed", "backoff", "load", "ready"]
            lease.release()

    run(scenario)


def test_a_spawn_that_fails_outside_memserve_releases_its_memory_and_marks_the_model_failed(tmp_path: Path) -> None:
    """An OSError from the spawner (no interpreter, no file descriptors) is a failed load, not a stuck one."""
    spawner = FakeSpawner()
    real_spawn = FakeSpawner.__call__

    async def spawn_once_failing(self: FakeSpawner, *args: Any) -> Any:
        if not self.spawned and not getattr(self, "failed_once", False):
            self.failed_once = True  # type: ignore[attr-defined]
            raise OSError(24, "Too many open files")
        return await real_spawn(self, *args)

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], spawner=spawner) as h:
            with pytest.raises(RunnerFailed, match=r"could not be started: OSError: .*Too many open files") as info:
                await h.pool.acquire("a")
            entry = h.pool.entries["a"]
            assert info.value.status_code == 502
            assert entry.state == "failed" and "Too many open files" in str(entry.reason)
            assert h.pool.ledger.names() == [] and h.pool.ledger.reserved("a") == {}
            assert entry.runner is None and entry.load_task is None and entry.failures == 1
            assert h.pool.row(entry)["devices"] == {}
            assert h.kinds("a") == ["load", "load_failed"]
            lease = await h.pool.acquire("a")  # the next request loads it again
            assert h.state("a") == "ready" and len(h.spawner.spawned) == 1
            lease.release()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeSpawner, "__call__", spawn_once_failing)
        run(scenario)


@pytest.mark.parametrize(("max_queue", "runner_queue"), [(None, 4 * 3), (0, 0), (7, 7)])
def test_the_runner_is_told_the_models_max_queue(tmp_path: Path, max_queue: int | None, runner_queue: int) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", concurrency=3, max_queue=max_queue)]) as h:
            await use(h.pool, "a")
            launch = h.spawner.spawned[0].launch
            assert launch.max_queue == max_queue and launch.queue == runner_queue
            assert launch.to_json()["plan"].get("max_queue") == max_queue  # in the plan file the runner reads
            assert h.pool.entries["a"].max_in_flight == 3 + runner_queue  # the gateway admits as many

    run(scenario)


def test_a_runner_that_keeps_crashing_after_ready_backs_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scaled_backoff(monkeypatch)

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            for _ in range(2):
                await use(h.pool, "a")
                h.spawner.spawned[-1].exit(-9)
                await until(lambda: h.state("a") == "failed", "the crash")
            await use(h.pool, "a")
            assert [e["seconds"] for e in h.events("backoff", "a")] == [pytest.approx(0.1)]

    run(scenario)


# -------------------------------------------------------------------------------------------------- watchdog


def test_watchdog_kills_a_ready_runner_past_its_plan_and_the_tolerance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            await use(h.pool, "a")
            runner, entry = h.spawner.spawned[0], h.pool.entries["a"]
            reserved = h.pool.ledger.reserved(entry.name)["cpu"]
            limit = watchdog_limit_bytes(reserved, 0.10, 128 * MiB)
            runner.memory_bytes = {"cpu": limit}  # at the limit: allowed
            sampled = runner.samples_taken
            await until(lambda: runner.samples_taken >= sampled + 3, "three samples")
            assert runner.kill_calls == 0 and entry.state == "ready"
            assert h.pool.row(entry)["devices"]["cpu"] == {"reserved_bytes": reserved, "measured_bytes": limit}
            runner.memory_bytes = {"cpu": limit + 1}
            await until(lambda: entry.state == "failed", "the watchdog")
            assert runner.kill_calls == 1
            assert "stopped by the watchdog" in str(entry.reason) and "went past its plan" in str(entry.reason)
            [kill] = h.events("watchdog_kill", "a")
            assert kill["measured_bytes"] == limit + 1 and kill["limit_bytes"] == limit
            assert kill["previous_bytes"] == limit  # the sample before the breach, still within it
            assert "went past its plan" in h.events("crash", "a")[0]["reason"]
            assert h.pool.ledger.names() == []

    run(scenario)


def with_margin(measured_bytes: int) -> int:
    """What the pool reserves after a kill at ``measured_bytes``: the figure plus the watchdog's tolerance."""
    return watchdog_limit_bytes(measured_bytes, 0.10, 128 * MiB)


def test_watchdog_kill_while_loading_retries_the_same_rung_with_the_measured_reservation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=GPU_HOST) as h:
            never_over_usable(h.pool.ledger)
            h.spawner.script("a", RunnerScript(ready_after_seconds=None, memory_bytes={"cuda:0": 20 * GiB}))
            lease = await h.pool.acquire("a")
            first, second = h.spawner.spawned
            assert (first.launch.plan.rung, second.launch.plan.rung) == ("gpu", "gpu")
            assert first.launch.plan == second.launch.plan and first.kill_calls == 1 and second.kill_calls == 0
            estimate = first.launch.plan.devices["cuda:0"].total_bytes
            reserved = h.pool.ledger.reserved("a")["cuda:0"]
            assert estimate < 20 * GiB < reserved == with_margin(20 * GiB)
            assert h.pool.ledger.held("a")["cuda:0"] == reserved
            [learned] = h.events("learned", "a")
            assert learned["measured_bytes"] == {"cuda:0": 20 * GiB}
            assert learned["next_reserved_bytes"] == {"cuda:0": reserved}
            [retry] = h.events("retry", "a")
            assert retry["rung"] == "gpu" and retry["reserved_bytes"]["cuda:0"] == reserved
            assert "went past its plan" in retry["reason"]
            assert h.kinds("a").index("watchdog_kill") < h.kinds("a").index("learned") < h.kinds("a").index("retry")
            assert h.events("retry_lower") == [] and h.pool.entries["a"].skip_rungs == frozenset()
            row = h.pool.row(h.pool.entries["a"])
            assert row["state"] == "ready" and row["rung"] == "gpu"
            lease.release()

    run(scenario)


def test_watchdog_kill_while_loading_goes_one_rung_lower_when_the_measured_reservation_does_not_fit(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=GPU_HOST) as h:
            never_over_usable(h.pool.ledger)
            usable = h.pool.ledger.usable_bytes()["cuda:0"]
            measured = usable - GiB  # within the GPU, but not with the margin on top
            assert with_margin(measured) > usable
            h.spawner.script("a", RunnerScript(ready_after_seconds=None, memory_bytes={"cuda:0": measured}))
            lease = await h.pool.acquire("a")
            first, second = h.spawner.spawned
            assert (first.launch.plan.rung, second.launch.plan.rung) == ("gpu", "gpu-int8")
            [lower] = h.events("rung_lower", "a")
            assert (lower["failed_rung"], lower["rung"]) == ("gpu", "gpu-int8")
            assert f"as gpu it needs {format_bytes(with_margin(measured))} on cuda:0" in lower["reason"]
            assert f"at most {format_bytes(usable)} on cuda:0 is usable" in lower["reason"]
            int8_bytes = second.launch.plan.devices["cuda:0"].total_bytes
            assert h.pool.ledger.held("a")["cuda:0"] == int8_bytes  # int8 never ran: its estimate
            assert h.pool.row(h.pool.entries["a"])["rung"] == "gpu-int8"
            lease.release()

    run(scenario)


def test_a_crash_past_the_plan_is_learned_from_the_runners_own_peak(tmp_path: Path) -> None:
    """The kernel's OOM killer got there first: no watchdog sample, but the runner had reported its peak."""

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(GATED)) as h:
            task = asyncio.create_task(h.pool.acquire("a"))
            await until(lambda: len(h.spawner.spawned) == 1, "the spawn")
            first, entry = h.spawner.spawned[0], h.pool.entries["a"]
            peak = h.pool.ledger.reserved(entry.name)["cpu"] + 64 * MiB  # past the plan, under the watchdog's limit
            first.emit_phase("fault_in", peak_rss_bytes=peak)
            first.exit(-9)
            await until(lambda: len(h.spawner.spawned) == 2, "the retry")
            second = h.spawner.spawned[1]
            reserved = h.pool.ledger.reserved(entry.name)
            assert second.launch.plan == first.launch.plan and reserved == {"cpu": with_margin(peak)}
            assert second.launch.reserved_bytes == reserved  # the runner is told what it may use
            assert h.events("watchdog_kill") == [] and "SIGKILL" in h.events("retry", "a")[0]["reason"]
            second.make_ready()
            (await task).release()
            assert entry.state == "ready" and entry.rung_kills == {"cpu": 1}

    run(scenario)


def test_a_crash_within_the_plan_teaches_nothing_and_is_not_retried(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(GATED)) as h:
            task = asyncio.create_task(h.pool.acquire("a"))
            await until(lambda: len(h.spawner.spawned) == 1, "the spawn")
            first, entry = h.spawner.spawned[0], h.pool.entries["a"]
            first.emit_phase("fault_in", peak_rss_bytes=h.pool.ledger.reserved(entry.name)["cpu"] - MiB)
            first.exit(1, "ValueError: bad config.json")
            with pytest.raises(RunnerFailed, match=r"ValueError: bad config\.json"):
                await task
            assert len(h.spawner.spawned) == 1 and h.events("learned") == [] and entry.rung_kills == {}

    run(scenario)


def test_a_warm_up_peak_above_the_plan_is_reserved_before_any_traffic(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(GATED)) as h:
            task = asyncio.create_task(h.pool.acquire("a"))
            await until(lambda: len(h.spawner.spawned) == 1, "the spawn")
            runner, entry = h.spawner.spawned[0], h.pool.entries["a"]
            planned = dict(h.pool.ledger.reserved(entry.name))
            assert runner.launch.reserved_bytes == planned  # the runner is told what it may use
            needs = planned["cpu"] + 200 * MiB  # even one sequence does not fit: the runner says so
            runner.emit_phase("worst_case", fits=False, peak_bytes={"cpu": needs}, needs_bytes={"cpu": needs})
            runner.make_ready()
            lease = await task
            assert h.pool.ledger.reserved(entry.name) == {"cpu": needs} and h.pool.ledger.held("a") == {"cpu": needs}
            [reserve] = h.events("reserve", "a")
            assert reserve["reserved_bytes"] == {"cpu": needs}
            assert (
                reserve["reason"] == f"its warm-up peaked at {format_bytes(needs)} on cpu, 200.0 MiB on cpu above "
                "its reservation"
            )
            assert h.kinds("a").index("reserve") < h.kinds("a").index("ready")
            assert entry.calibration_key is not None
            assert h.pool.calibration.get(*entry.calibration_key) == {"cpu": needs}
            lease.release()

    run(scenario)


def test_a_warm_up_peak_with_no_room_beside_the_others_loads_again_after_making_room(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a"), model("b")]) as h:  # 8 GiB: room for both as planned
            never_over_usable(h.pool.ledger)
            await use(h.pool, "a")
            peak = 7 * GiB  # more than is free beside a, less than the whole
            h.spawner.script("b", *[RunnerScript(ready_report=ready_at(peak))] * 2)
            lease = await h.pool.acquire("b")
            assert h.spawner.journal == [("spawn", "a"), ("spawn", "b"), ("stop", "b"), ("stop", "a"), ("spawn", "b")]
            assert h.pool.ledger.reserved("b") == {"cpu": with_margin(peak)}
            assert [e["model"] for e in h.events("evict")] == ["a"]
            [learned] = h.events("learned", "b")
            assert learned["measured_bytes"] == {"cpu": peak}
            assert "no room for that beside the other models" in h.events("retry", "b")[0]["reason"]
            lease.release()

    run(scenario)


def test_a_measured_need_above_the_capacity_is_loaded_with_all_of_it_not_refused_for_good(tmp_path: Path) -> None:
    """One kill at the whole budget (a request no plan admits, say) must not refuse for good a model whose
    estimate fits: with nothing lower, it is loaded on its rung with all that is usable."""

    async def scenario() -> None:
        only_cpu = model("a", policy={"quantization": "none"})  # no lighter CPU rung
        async with running_pool(tmp_path, [only_cpu], inventory=cpu_host(ONE_MODEL_GIB)) as h:
            never_over_usable(h.pool.ledger)
            usable = h.pool.ledger.usable_bytes()["cpu"]
            h.spawner.script("a", RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": usable}))
            lease = await h.pool.acquire("a")
            first, second = h.spawner.spawned
            estimate = first.launch.plan.devices["cpu"].total_bytes
            assert first.launch.plan == second.launch.plan and h.pool.ledger.reserved("a") == {"cpu": usable}
            [capped] = h.events("reservation_capped", "a")
            assert capped["reserved_bytes"] == {"cpu": usable}
            assert capped["reason"] == (
                f"as cpu it needs {format_bytes(with_margin(usable))} on cpu (learned from a runner with this plan; "
                f"estimated {format_bytes(estimate)} on cpu) but at most {format_bytes(usable)} on cpu is usable, "
                "and no lower rung on the ladder fits or is allowed: it is loaded with all that is usable, and the "
                "watchdog stops it past that plus the tolerance"
            )
            lease.release()
            assert await h.pool.unload("a")
            await use(h.pool, "a")  # and so again next time, from the calibration
            assert h.pool.ledger.reserved("a") == {"cpu": usable} and len(h.spawner.spawned) == 3

    run(scenario)


def test_after_kills_on_the_only_rung_a_507_is_the_planners_whole_message(tmp_path: Path) -> None:
    """A CPU-only model whose cpu rung two kills ruled out, asked for more than fits: the 507 names what is
    needed and usable and what would fit, never the skip ("closest is cpu: .", "if allowed: skipped")."""

    async def scenario() -> None:
        only_cpu = model("a", policy={"quantization": "none"})  # no lighter CPU rung
        async with running_pool(tmp_path, [only_cpu], inventory=cpu_host(ONE_MODEL_GIB)) as h:
            for memory in (2 * GiB, 2 * GiB + 600 * MiB):  # two kills on cpu, the second past the learned figure
                h.spawner.script("a", RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": memory}))
            with pytest.raises(RunnerFailed):
                await h.pool.acquire("a")
            assert "cpu" in h.pool.entries["a"].skip_rungs
            with pytest.raises(InsufficientMemory) as info:
                await h.pool.load("a", context_tokens=32768, concurrency=8)
            message = info.value.message
            assert info.value.status_code == 507
            assert message.startswith(
                "model 'a' cannot fit on this server even with nothing else loaded: mem://a "
                "does not fit on this host; closest is cpu: cpu needs "
            )
            assert f"but has {format_bytes(h.pool.ledger.usable_bytes()['cpu'])} usable. Nearest options: " in message
            assert "fits as cpu with --context " in message
            for garbled in ("closest is cpu: .", "if allowed", "skipped", "used more memory than planned"):
                assert garbled not in message
            await use(h.pool, "a")  # and the model is still served as configured
            assert h.state("a") == "ready"

    run(scenario)


def test_two_kills_on_the_only_rung_fail_that_load_and_the_next_request_is_still_served(tmp_path: Path) -> None:
    async def scenario() -> None:
        models = [
            model("lowest", policy={"quantization": "none"}),
            model("strict", policy={"retry_lower": False, "quantization": "none"}),
        ]
        async with running_pool(tmp_path, models) as h:  # CPU only, no quantization: nothing below the cpu rung
            h.spawner.script(
                "lowest",
                RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 3 * GiB}),
                RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 4 * GiB}),
            )
            h.spawner.script("strict", RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 3 * GiB}))
            with pytest.raises(
                RunnerFailed,
                match="no lower rung on the ladder fits or is allowed; the next "
                "request loads it again on that rung with the reservation it measured",
            ) as lowest:
                await h.pool.acquire("lowest")
            with pytest.raises(RunnerFailed, match=r"^model 'strict' was stopped by the watchdog") as strict:
                await h.pool.acquire("strict")
            for name, error, kills in (("lowest", lowest.value, [1, 1]), ("strict", strict.value, [1])):
                assert "went past its plan" in error.message
                assert [r.kill_calls for r in h.spawner.runners(name)] == kills
                assert h.state(name) == "failed" and h.pool.row(h.pool.entries[name])["reason"] == error.message
                assert "went past its plan" in h.events("watchdog_kill", name)[0]["reason"]
            assert [e["model"] for e in h.events("retry_lower")] == ["lowest"]
            assert h.pool.entries["lowest"].skip_rungs >= {"cpu"}
            assert h.pool.entries["strict"].skip_rungs == frozenset()
            assert h.pool.ledger.names() == []
            for name, measured in (("lowest", 4 * GiB), ("strict", 3 * GiB)):  # then served, on the cpu rung
                lease = await h.pool.acquire(name)
                entry = h.pool.entries[name]
                assert entry.state == "ready" and entry.plan is not None and entry.plan.rung == "cpu"
                assert h.pool.ledger.reserved(entry.name) == {"cpu": with_margin(measured)}
                lease.release()
            [lifted] = h.events("retry", "lowest")[-1:]
            assert lifted["rung"] == "cpu" and "nothing below cpu fits or is allowed" in lifted["reason"]

    run(scenario)


def test_a_cpu_load_that_overruns_retries_at_int8_then_4bit_and_says_so(tmp_path: Path) -> None:
    """CPU only, one model's room: each runner is killed past what any reservation on its rung could hold, so the
    next load is one lighter rung down (bf16 → int8 → 4-bit), and each retry names the rung, what was measured and
    what the failed runner had reserved."""

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=cpu_host(ONE_MODEL_GIB)) as h:
            never_over_usable(h.pool.ledger)
            usable = h.pool.ledger.usable_bytes()["cpu"]
            measured = usable - 64 * MiB  # within the budget, but not with the watchdog's margin on top
            assert with_margin(measured) > usable
            overrun = RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": measured})
            h.spawner.script("a", overrun, overrun)
            lease = await h.pool.acquire("a")
            plans = [r.launch.plan for r in h.spawner.runners("a")]
            assert [(p.rung, p.quantization) for p in plans] == [
                ("cpu", "none"),
                ("cpu-int8", "int8"),
                ("cpu-4bit", "4bit"),
            ]
            assert [r.kill_calls for r in h.spawner.runners("a")] == [1, 1, 0]
            estimates = [p.devices["cpu"].total_bytes for p in plans]
            assert estimates[0] > estimates[1] > estimates[2]
            # each retry plans from the top of the ladder again, with everything learned so far
            assert [(e["failed_rung"], e["rung"]) for e in h.events("rung_lower", "a")] == [
                ("cpu", "cpu-int8"),
                ("cpu", "cpu-int8"),
                ("cpu-int8", "cpu-4bit"),
            ]
            retries = h.events("retry", "a")
            assert [e["rung"] for e in retries] == ["cpu-int8", "cpu-4bit"]
            for retry, failed in zip(retries, estimates[:2], strict=True):
                assert retry["measured_bytes"] == {"cpu": measured}
                assert retry["failed_reserved_bytes"] == {"cpu": failed}  # the failed rung's estimate
                assert "went past its plan" in retry["reason"]
            assert retries[0]["reserved_bytes"] == {"cpu": estimates[1]}
            assert retries[1]["reserved_bytes"] == {"cpu": estimates[2]}
            assert [e["rung"] for e in h.events("learned", "a")] == ["cpu", "cpu-int8"]
            assert h.pool.row(h.pool.entries["a"])["rung"] == "cpu-4bit"
            assert h.pool.ledger.held("a") == {"cpu": estimates[2]}
            lease.release()

    run(scenario)


def test_two_kills_on_cpu_retry_lower_at_int8_naming_the_rung_and_the_bytes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:  # 8 GiB: a learned reservation still fits
            h.spawner.script(
                "a",
                RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 3 * GiB}),
                RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 4 * GiB}),
            )
            lease = await h.pool.acquire("a")
            assert [r.launch.plan.rung for r in h.spawner.runners("a")] == ["cpu", "cpu", "cpu-int8"]
            [same] = h.events("retry", "a")
            assert same["rung"] == "cpu" and same["measured_bytes"] == {"cpu": 3 * GiB}
            assert same["reserved_bytes"] == {"cpu": with_margin(3 * GiB)}
            [lower] = h.events("retry_lower", "a")
            assert (lower["failed_rung"], lower["rung"]) == ("cpu", "cpu-int8")
            assert lower["measured_bytes"] == {"cpu": 4 * GiB}
            assert lower["failed_reserved_bytes"] == {"cpu": with_margin(3 * GiB)}
            int8 = h.spawner.runners("a")[2].launch
            assert lower["reserved_bytes"] == int8.reserved_bytes == {"cpu": int8.plan.devices["cpu"].total_bytes}
            assert "went past its plan" in lower["reason"]
            assert h.pool.entries["a"].skip_rungs >= {"cpu"} and h.state("a") == "ready"
            lease.release()

    run(scenario)


def test_watchdog_kill_of_a_ready_runner_reloads_on_its_rung_then_one_lower_after_a_second_kill(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=GPU_HOST) as h:
            await use(h.pool, "a")
            h.spawner.spawned[0].memory_bytes = {"cuda:0": 12 * GiB}
            await until(lambda: h.state("a") == "failed", "the watchdog")
            await use(h.pool, "a")
            assert [r.launch.plan.rung for r in h.spawner.spawned] == ["gpu", "gpu"]
            assert h.pool.ledger.reserved("a")["cuda:0"] == with_margin(12 * GiB)
            h.spawner.spawned[1].memory_bytes = {"cuda:0": 16 * GiB}  # past the bigger reservation too
            await until(lambda: h.state("a") == "failed", "the second kill")
            assert h.pool.entries["a"].rung_kills == {"gpu": 2} and "gpu" in h.pool.entries["a"].skip_rungs
            await use(h.pool, "a")
            assert [r.launch.plan.rung for r in h.spawner.spawned] == ["gpu", "gpu", "gpu-int8"]
            assert [e["failed_rung"] for e in h.events("retry_lower", "a")] == ["gpu"]

    run(scenario)


def test_the_issue_11_story_a_kill_on_cpu_is_not_an_outage(tmp_path: Path) -> None:
    """demo-small, CPU only: killed by a long prompt; the next request is served with a reservation above
    the measured peak, and a restarted gateway keeps it even when the next warm-up peaks lower."""
    warm_up = ready_at(GiB)

    async def scenario() -> None:
        spawner = FakeSpawner(RunnerScript(ready_report=warm_up))
        async with running_pool(tmp_path, [model("a")], spawner=spawner) as h:
            await use(h.pool, "a")
            entry, first = h.pool.entries["a"], h.spawner.spawned[0]
            assert h.pool.ledger.reserved(entry.name) == {"cpu": first.launch.plan.devices["cpu"].total_bytes}
            killed_at = watchdog_limit_bytes(h.pool.ledger.reserved(entry.name)["cpu"], 0.10, 128 * MiB) + MiB
            first.memory_bytes = {"cpu": killed_at}  # the long prompt
            await until(lambda: h.state("a") == "failed", "the watchdog")
            lease = await h.pool.acquire("a")
            second = h.spawner.spawned[1]
            assert second.launch.plan == first.launch.plan and entry.state == "ready"
            assert h.pool.ledger.reserved(entry.name) == {"cpu": with_margin(killed_at)}
            assert with_margin(killed_at) > killed_at
            lease.release()
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(RunnerScript(ready_report=warm_up))) as h:
            await use(h.pool, "a")  # a new gateway, same data_dir; its warm-up peaks at 1 GiB only
            assert h.pool.ledger.reserved("a") == {"cpu": with_margin(killed_at)}
            await h.pool.unload("a")
            await use(h.pool, "a")
            assert h.pool.ledger.reserved("a") == {"cpu": with_margin(killed_at)}

    run(scenario)


def test_a_watchdog_reason_is_not_blamed_on_the_next_runner(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            h.spawner.script(
                "a", RunnerScript(exit_on_kill=False), RunnerScript(fail_while_loading="ValueError: bad config.json")
            )
            await use(h.pool, "a")
            first = h.spawner.spawned[0]
            first.memory_bytes = {"cpu": 8 * GiB}
            await until(lambda: first.kill_calls == 1, "the watchdog's kill")
            assert await h.pool.unload("a") is True  # stopped on purpose before the kill landed
            with pytest.raises(RunnerFailed) as info:
                await h.pool.acquire("a")
            assert "exited with code 1: ValueError: bad config.json" in info.value.message
            assert "watchdog" not in info.value.message and h.events("retry_lower") == []

    run(scenario)


def test_host_below_its_floor_kills_the_loading_runner_first(tmp_path: Path) -> None:
    async def scenario() -> None:
        only_cpu = model("a", policy={"quantization": "none"})  # no lighter CPU rung
        async with running_pool(tmp_path, [only_cpu, model("b")], start=True) as h:
            await use(h.pool, "b")
            h.spawner.script("a", GATED)
            task = asyncio.create_task(h.pool.acquire("a"))
            await until(lambda: len(h.spawner.runners("a")) == 1, "a to start loading")
            h.host.samples.append(100 * MiB)  # one look below the 256 MiB floor
            with pytest.raises(RunnerFailed, match=r"host available memory .* below the floor .* no lower rung"):
                await task
            assert h.spawner.runners("a")[0].kill_calls == 1
            assert h.spawner.runners("b")[0].kill_calls == 0 and h.state("b") == "ready"
            [kill] = h.events("watchdog_kill")
            assert kill["model"] == "a" and kill["available_bytes"] == 100 * MiB
            assert "host available memory" in kill["reason"] and "below the floor" in kill["reason"]
            assert h.state("a") == "failed"

    run(scenario)


# ---------------------------------------------------------------------------------------------- unload, load


def test_unload_drains_the_leases_then_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a"), model("b")]) as h:
            lease = await h.pool.acquire("a")
            runner = h.spawner.spawned[0]
            unloading = asyncio.create_task(h.pool.unload("a"))
            await until(lambda: h.state("a") == "draining", "draining")
            await asyncio.sleep(0.05)
            assert not unloading.done() and runner.stop_calls == 0
            lease.release()
            assert await unloading is True
            assert runner.stop_calls == 1 and h.state("a") == "stopped"
            assert h.pool.ledger.names() == []
            assert h.events("stopped", "a")[-1]["reason"] == "unloaded on request"
            assert await h.pool.unload("a") is False
            assert await h.pool.unload("b") is False  # never loaded
            assert runner.stop_calls == 1

    run(scenario)


def test_load_keeps_a_compatible_runner_and_reloads_for_a_larger_context(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            row = await h.pool.load("a")
            first = h.spawner.spawned[0]
            assert (row["state"], row["context_tokens"], row["pid"]) == ("ready", 2048, first.pid)
            for smaller in ({"context_tokens": 1024}, {"concurrency": 1}, {}):
                row = await h.pool.load("a", **smaller)
                assert row["pid"] == first.pid and row["context_tokens"] == 2048
            assert len(h.spawner.spawned) == 1 and first.stop_calls == 0
            row = await h.pool.load("a", context_tokens=4096)
            second = h.spawner.spawned[1]
            assert first.stop_calls == 1 and second.launch.plan.context_tokens == 4096
            assert (row["pid"], row["context_tokens"], row["state"]) == (second.pid, 4096, "ready")
            assert len(h.events("reload", "a")) == 1

    run(scenario)


def test_unload_clears_a_failed_model_and_the_next_request_loads_it_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scaled_backoff(monkeypatch)

    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=GPU_HOST) as h:
            for memory in (12 * GiB, 16 * GiB):  # two kills on the gpu rung, then a crash one rung lower
                await use(h.pool, "a")
                h.spawner.spawned[-1].memory_bytes = {"cuda:0": memory}
                await until(lambda: h.state("a") == "failed", "the watchdog")
            await use(h.pool, "a")
            h.spawner.spawned[-1].exit(-9)
            await until(lambda: h.state("a") == "failed", "the crash")
            entry = h.pool.entries["a"]
            assert entry.failures == 3 and entry.rung_kills == {"gpu": 2} and "gpu" in entry.skip_rungs
            assert entry.reason is not None and "SIGKILL" in entry.reason
            assert await h.pool.unload("a") is True
            assert (entry.state, entry.reason, entry.failures) == ("stopped", None, 0)
            assert entry.skip_rungs == frozenset() and entry.rung_kills == {}
            assert h.pool.ps()["models"] == [] and h.events("cleared", "a")[0]["reason"].startswith("failed model")
            assert await h.pool.unload("a") is False  # nothing left to stop or clear
            backoffs = len(h.events("backoff", "a"))
            await use(h.pool, "a")
            assert len(h.events("backoff", "a")) == backoffs  # a fresh start: no backoff
            assert h.spawner.spawned[-1].launch.plan.rung == "gpu"  # the skipped rung is back ...
            assert h.pool.ledger.reserved(entry.name)["cuda:0"] == with_margin(16 * GiB)  # ... with what it measured

    run(scenario)


def test_load_options_apply_to_that_load_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a", concurrency=2)]) as h:
            row = await h.pool.load("a", context_tokens=4096, concurrency=3)
            assert (row["context_tokens"], row["concurrency"]) == (4096, 3)
            assert h.pool.entries["a"].pending_options is None
            assert await h.pool.unload("a")
            await use(h.pool, "a")  # the next load, by a request: the configuration again
            assert [(r.launch.plan.context_tokens, r.launch.plan.concurrency) for r in h.spawner.spawned] == [
                (4096, 3),
                (2048, 2),
            ]
            assert await h.pool.unload("a")
            row = await h.pool.load("a")
            assert (row["context_tokens"], row["concurrency"]) == (2048, 2)

    run(scenario)


def test_load_options_of_a_refused_load_do_not_outlive_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")], inventory=cpu_host(ONE_MODEL_GIB)) as h:
            with pytest.raises(InsufficientMemory):
                await h.pool.load("a", concurrency=512)  # valid, but far too much KV for this budget
            assert h.pool.entries["a"].pending_options is None and h.spawner.spawned == []
            row = await h.pool.load("a")
            assert (row["state"], row["concurrency"]) == ("ready", 1)

    run(scenario)


@pytest.mark.parametrize(
    ("options", "param", "fragment"),
    [
        ({"concurrency": -3}, "concurrency", "concurrency must be a whole number of sequences, 1 or more; got -3"),
        ({"concurrency": 0}, "concurrency", "got 0"),
        ({"context_tokens": 0}, "context", "context must be a whole number of tokens, 1 or more; got 0"),
        ({"context_tokens": -1, "concurrency": 2}, "context", "got -1"),
        ({"context_tokens": True}, "context", "got True"),
        ({"concurrency": 2.5}, "concurrency", "got 2.5"),
        ({"context_tokens": "4096"}, "context", "got '4096'"),
        ({"context_tokens": 40_000}, "context", "more than mem://a supports (max_position_embeddings 32768)"),
        ({"concurrency": 10_000}, None, "concurrency must be between 1 and 4096"),
    ],
)
def test_invalid_load_options_are_refused_before_anything_changes(
    tmp_path: Path, options: dict[str, Any], param: str | None, fragment: str
) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            await use(h.pool, "a")
            runner, events = h.spawner.spawned[0], len(h.pool.events)
            with pytest.raises(InvalidArgument) as info:
                await h.pool.load("a", **options)
            assert info.value.status_code == 400 and fragment in info.value.message
            assert info.value.param == param
            entry = h.pool.entries["a"]
            assert entry.pending_options is None and entry.state == "ready" and entry.runner is runner
            assert runner.stop_calls == 0 and len(h.spawner.spawned) == 1 and len(h.pool.events) == events
            row = await h.pool.load("a")  # and the next load is not poisoned
            assert (row["pid"], row["context_tokens"], row["concurrency"]) == (runner.pid, 2048, 1)

    run(scenario)


def test_lifecycle_log_lines_read_as_key_value_pairs_with_units(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a")]) as h:
            await use(h.pool, "a")
            runner, entry = h.spawner.spawned[0], h.pool.entries["a"]
            reserved = h.pool.ledger.reserved(entry.name)["cpu"]
            runner.memory_bytes = {"cpu": 8 * GiB}
            await until(lambda: entry.state == "failed", "the watchdog")
            lines = [r.getMessage() for r in caplog.records if r.name == "memserve.pool"]
            load = f'load a rung=cpu reserved="{format_bytes(reserved)} on cpu" planned="'
            assert any(line.startswith(load) for line in lines)
            [kill] = [line for line in lines if line.startswith("watchdog_kill a ")]
            assert kill.startswith(f'watchdog_kill a pid={runner.pid} device=cpu measured="8.0 GiB" limit="')
            assert kill.endswith(
                'reason="stopped by the watchdog: cpu use 8.0 GiB went past its plan of '
                f"{format_bytes(reserved)} plus the tolerance (limit "
                f'{format_bytes(with_margin(reserved))}) while ready"'
            )
            assert not any("{" in line for line in lines)  # no dicts printed raw
            assert isinstance(h.events("watchdog_kill", "a")[0]["measured_bytes"], int)  # the JSON is unchanged

    with caplog.at_level(logging.INFO, logger="memserve.pool"):
        run(scenario)


# ------------------------------------------------------------------------------------------- ps, events, stop


def test_ps_rows_have_the_documented_keys_and_events_tell_the_story(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_pool(tmp_path, [model("a"), model("b")]) as h:
            lease = await h.pool.acquire("a")
            runner, entry = h.spawner.spawned[0], h.pool.entries["a"]
            ps = h.pool.ps()
            [row] = ps["models"]  # b is stopped: not listed
            assert set(row) == ROW_KEYS
            reserved = h.pool.ledger.reserved(entry.name)["cpu"]
            assert row == {
                "name": "a",
                "state": "ready",
                "pid": runner.pid,
                "source": "mem://a",
                "adapters": [],
                "rung": "cpu",
                "dtype": "bfloat16",
                "quantization": "none",
                "context_tokens": 2048,
                "concurrency": 1,
                "devices": {"cpu": {"reserved_bytes": reserved, "measured_bytes": 0}},
                "leases": 1,
                "queued": 0,
                "pinned": False,
                "keep_alive_seconds": 60.0,
                "expires_at": None,
                "load_seconds": row["load_seconds"],
                "reason": None,
                "runner": "transformers",
                "socket": None,  # fakes have no socket
            }
            assert row["load_seconds"] is not None and row["load_seconds"] >= 0
            assert ps["devices"]["cpu"]["held_bytes"] == reserved
            reply = PsReply.model_validate(ps)  # what `memserve ps` reads
            assert reply.models[0].devices["cpu"].reserved_bytes == reserved
            lease.release()
            events = h.pool.events_since(0)
            assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
            assert [e["event"] for e in events if e["event"] != "phase"] == ["load", "ready"]
            assert h.pool.events_since(events[-1]["seq"]) == []
            assert events[0]["reserved_bytes"] == {"cpu": reserved} and events[0]["rung"] == "cpu"

    run(scenario)


def test_shutdown_stops_every_runner(tmp_path: Path) -> None:
    async def scenario() -> None:
        models = [model("a"), model("b"), model("c", preload=True)]
        spawner = FakeSpawner()
        spawner.script("c", GATED)
        async with running_pool(tmp_path, models, spawner=spawner, start=True) as h:
            await use(h.pool, "a")
            await use(h.pool, "b")
            await until(lambda: len(spawner.runners("c")) == 1, "c's preload")
            assert h.state("c") == "starting"
            await h.pool.shutdown()
            assert sorted(r.name for r in spawner.spawned) == ["a", "b", "c"]
            assert [r.stop_calls for r in spawner.spawned] == [1, 1, 1]
            assert {h.state(name) for name in "abc"} == {"stopped"}
            assert h.pool.ledger.names() == []
            with pytest.raises(MemoryBusy, match="shutting down"):
                await h.pool.acquire("a")

    run(scenario)


def test_a_measured_peak_replaces_the_estimate_next_time_and_survives_a_restart(tmp_path: Path) -> None:
    measured = ready_at(GiB)  # the runner's own report at ready

    async def scenario() -> None:
        spawner = FakeSpawner(RunnerScript(ready_report=measured))
        async with running_pool(tmp_path, [model("a")], spawner=spawner) as h:
            (await h.pool.acquire("a")).release()
            estimate = h.spawner.spawned[0].launch.plan.devices["cpu"].total_bytes
            assert h.pool.ledger.reserved("a") == {"cpu": estimate} and estimate != GiB
            assert await h.pool.unload("a")
            (await h.pool.acquire("a")).release()
            assert h.pool.ledger.reserved("a") == {"cpu": GiB}
        assert (tmp_path / "calibration.json").exists()
        async with running_pool(tmp_path, [model("a")], spawner=FakeSpawner(RunnerScript(ready_report=measured))) as h:
            (await h.pool.acquire("a")).release()
            assert h.pool.ledger.reserved("a") == {"cpu": GiB}  # a new gateway, same data_dir

    run(scenario)
