"""The pool's lifecycle counters: each event moves exactly its counters, and a real pool's acts are counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from memserve.errors import Overloaded
from memserve.memory.planner import RUNGS
from memserve.pool.counters import (
    CRASHES,
    ESTIMATE_RATIO,
    EVICTIONS,
    KILLS,
    LAST_ESTIMATE_RATIO,
    LOAD_FAILURES,
    LOAD_SECONDS,
    LOADS,
    PHASE_SECONDS,
    RAISES,
    REFUSALS,
    RESTARTS,
    RETRIES,
    PoolCounters,
)
from memserve.pool.events import EventLog, PoolEventKind
from memserve.tally import Family, Labels
from tests.pool.fake_runner import RunnerScript
from tests.pool.test_pool import ONE_MODEL_GIB, cpu_host, model, run, running_pool, until, use

GiB = 1 << 30


def counts(counters: PoolCounters) -> dict[tuple[Family, Labels], float]:
    return {(family, labels): value for family, values in counters.counts.items() for labels, value in values.items()}


def moved(before: dict[tuple[Family, Labels], float], after: dict[tuple[Family, Labels], float]) -> dict[Any, float]:
    return {
        (f.name, labels): v - before.get((f, labels), 0)
        for (f, labels), v in after.items()
        if v != before.get((f, labels), 0)
    }


def test_every_counter_starts_at_zero_for_every_model_and_fixed_label() -> None:
    values = counts(PoolCounters(["a", "b"]))
    assert all(v == 0 for v in values.values())
    for name in ("a", "b"):
        assert all((LOADS, (name, rung)) in values for rung in RUNGS)
        for reason in ("make_room", "keep_alive", "unload", "shutdown"):
            assert (EVICTIONS, (name, reason)) in values
        for code in ("insufficient_memory", "memory_busy", "queue_full"):
            assert (REFUSALS, (name, code)) in values
        assert (KILLS, (name, "reservation")) in values and (KILLS, (name, "host_floor")) in values
        assert (RETRIES, (name, "same_rung")) in values and (RETRIES, (name, "lower_rung")) in values
        for family in (RESTARTS, CRASHES, LOAD_FAILURES, RAISES):
            assert (family, (name,)) in values


@pytest.mark.parametrize(
    ("kind", "fields", "expected"),
    [
        (PoolEventKind.LOAD, {"rung": "cpu"}, {("memserve_model_loads", ("a", "cpu")): 1}),
        (
            PoolEventKind.LOAD,
            {"rung": "gpu", "after_failures": 2},
            {("memserve_model_loads", ("a", "gpu")): 1, ("memserve_model_restarts", ("a",)): 1},
        ),
        (PoolEventKind.STOPPED, {"cause": "make_room"}, {("memserve_model_evictions", ("a", "make_room")): 1}),
        (PoolEventKind.STOPPED, {"cause": "keep_alive"}, {("memserve_model_evictions", ("a", "keep_alive")): 1}),
        (PoolEventKind.STOPPED, {"cause": "unload"}, {("memserve_model_evictions", ("a", "unload")): 1}),
        (PoolEventKind.STOPPED, {"cause": "shutdown"}, {("memserve_model_evictions", ("a", "shutdown")): 1}),
        (PoolEventKind.STOPPED, {"cause": "load_failed"}, {}),
        (PoolEventKind.STOPPED, {"cause": "retry"}, {}),
        (PoolEventKind.EVICT, {"reason": "to make room for b"}, {}),  # counted when the runner is gone (stopped)
        (
            PoolEventKind.REFUSED,
            {"code": "insufficient_memory"},
            {("memserve_model_refusals", ("a", "insufficient_memory")): 1},
        ),
        (PoolEventKind.REFUSED, {"code": "memory_busy"}, {("memserve_model_refusals", ("a", "memory_busy")): 1}),
        (
            PoolEventKind.WATCHDOG_KILL,
            {"device": "cpu", "measured_bytes": 9, "limit_bytes": 8},
            {("memserve_watchdog_kills", ("a", "reservation")): 1},
        ),
        (
            PoolEventKind.WATCHDOG_KILL,
            {"available_bytes": 10},
            {("memserve_watchdog_kills", ("a", "host_floor")): 1},
        ),
        (PoolEventKind.CRASH, {"pid": 1}, {("memserve_model_crashes", ("a",)): 1}),
        (PoolEventKind.LOAD_FAILED, {"reason": "x"}, {("memserve_model_load_failures", ("a",)): 1}),
        (PoolEventKind.RETRY, {"rung": "cpu"}, {("memserve_model_load_retries", ("a", "same_rung")): 1}),
        (PoolEventKind.RETRY_LOWER, {"failed_rung": "gpu"}, {("memserve_model_load_retries", ("a", "lower_rung")): 1}),
        (PoolEventKind.RESERVE, {"reserved_bytes": {"cpu": 1}}, {("memserve_model_reservation_raises", ("a",)): 1}),
        (PoolEventKind.PHASE, {"phase": "map", "seconds": 0.2}, {}),
        (PoolEventKind.BACKOFF, {"seconds": 2}, {}),
        (PoolEventKind.CLEARED, {}, {}),
    ],
)
def test_each_event_moves_exactly_its_counters(kind: PoolEventKind, fields: dict[str, Any], expected: Any) -> None:
    counters = PoolCounters(["a"])
    log = EventLog(lambda: 0.0)
    log.subscribe(counters.hear)
    before = counts(counters)
    log.add(kind, "a", fields)
    assert moved(before, counts(counters)) == expected


def test_phases_load_time_and_the_estimate_ratio() -> None:
    counters = PoolCounters(["a"])
    hear = lambda kind, **fields: counters.hear(EventLog(lambda: 0.0).add(kind, "a", fields))  # noqa: E731
    hear(PoolEventKind.LOAD, rung="cpu", planned_bytes={"cpu": 1000, "cuda:0": 0})
    hear(PoolEventKind.PHASE, phase="map", seconds=0.3)
    hear(PoolEventKind.PHASE, phase="map", seconds=0.7)
    hear(PoolEventKind.READY, load_seconds=4.0, planned_bytes={"cpu": 1000}, peak_bytes={"cpu": 1100, "cuda:0": 5})
    assert counters.tallies[PHASE_SECONDS][("a", "map")].count == 2
    assert counters.tallies[PHASE_SECONDS][("a", "map")].sum == pytest.approx(1.0)
    assert counters.tallies[LOAD_SECONDS][("a",)].sum == 4.0
    ratio = counters.tallies[ESTIMATE_RATIO]
    assert list(ratio) == [("a", "cpu", "ready")], "a device the plan did not price has no ratio"
    assert ratio[("a", "cpu", "ready")].sum == pytest.approx(1.1)
    assert counters.last_ratio == {("a", "cpu"): pytest.approx(1.1)}
    # a reservation kill while loading: the kill's sample over the last load's plan, outcome killed
    hear(PoolEventKind.LOAD, rung="cpu", planned_bytes={"cpu": 1000})
    hear(PoolEventKind.WATCHDOG_KILL, device="cpu", measured_bytes=1500, limit_bytes=1200)
    assert ratio[("a", "cpu", "killed")].sum == pytest.approx(1.5)
    # a kill of a ready runner is a crash, not an estimate of a load
    hear(PoolEventKind.LOAD, rung="cpu", planned_bytes={"cpu": 1000})
    hear(PoolEventKind.READY, load_seconds=1.0, planned_bytes={"cpu": 1000}, peak_bytes={"cpu": 900})
    hear(PoolEventKind.WATCHDOG_KILL, device="cpu", measured_bytes=3000, limit_bytes=1200)
    assert ratio[("a", "cpu", "killed")].count == 1
    snapshot = dict(counters.snapshot())
    assert snapshot[LAST_ESTIMATE_RATIO] == {("a", "cpu"): pytest.approx(0.9)}
    hear(PoolEventKind.PHASE, phase="map", seconds=1.0)
    assert snapshot[PHASE_SECONDS][("a", "map")].count == 2, "a snapshot is a copy"


def test_a_pool_counts_what_it_does(tmp_path: Path) -> None:
    """Loads, a make_room eviction, a full queue (no event), an unload, a crash and its restart, a shutdown."""

    async def scenario() -> None:
        async with running_pool(
            tmp_path, [model("a"), model("b", max_queue=0)], inventory=cpu_host(ONE_MODEL_GIB), keep_alive_seconds=60
        ) as h:
            counters = h.pool.counters
            await use(h.pool, "a")
            lease = await h.pool.acquire("b")  # evicts a
            with pytest.raises(Overloaded):
                await h.pool.acquire("b")
            lease.release()
            assert await h.pool.unload("b")
            await use(h.pool, "a")
            h.spawner.spawned[-1].exit(-9)  # a crash of the ready runner
            await until(lambda: h.state("a") == "failed", "the crash")
            await use(h.pool, "a")  # its restart
            c = counters.counts
            assert c[LOADS][("a", "cpu")] == 3 and c[LOADS][("b", "cpu")] == 1
            assert c[EVICTIONS][("a", "make_room")] == 1 and c[EVICTIONS][("b", "unload")] == 1
            assert c[REFUSALS][("b", "queue_full")] == 1
            assert c[CRASHES][("a",)] == 1 and c[RESTARTS][("a",)] == 1
            assert sum(c[EVICTIONS].values()) == 2
            planned = h.events("load", "a")[-1]["planned_bytes"]
            ready = h.events("ready", "a")[-1]
            assert planned == ready["planned_bytes"] and planned["cpu"] > 0
            assert counters.tallies[LOAD_SECONDS][("a",)].count == 3
        assert counters.counts[EVICTIONS][("a", "shutdown")] == 1

    run(scenario)


def test_a_load_killed_by_the_watchdog_counts_a_kill_and_its_ratio(tmp_path: Path) -> None:
    async def scenario() -> None:
        spawner_script = RunnerScript(ready_after_seconds=None, memory_bytes={"cpu": 6 * GiB})
        async with running_pool(tmp_path, [model("a", policy={"retry_lower": False})]) as h:
            h.spawner.script("a", spawner_script)
            task = asyncio.create_task(use(h.pool, "a"))
            await until(lambda: h.state("a") == "failed", "the kill")
            with pytest.raises(Exception, match="watchdog"):
                await task
            c = h.pool.counters
            assert c.counts[KILLS][("a", "reservation")] == 1 and c.counts[LOAD_FAILURES][("a",)] == 1
            assert c.counts[CRASHES][("a",)] == 0, "a kill during a load is not a crash"
            assert c.tallies[ESTIMATE_RATIO][("a", "cpu", "killed")].count == 1

    run(scenario)
