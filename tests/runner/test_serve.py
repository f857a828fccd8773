"""The runner's loading happens off the main thread (see ``runner/threads.py`` for why), and ends with a
worst-case warm-up that makes what the runner admits fit its reservation (``fit_to_reservation``)."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from memserve.memory.estimate import DeviceNeed
from memserve.memory.fit import PlanFile
from memserve.runner import serve
from memserve.runner.load import WORST_CASE_PHASE, LoadReport
from memserve.runner.progress import LoadProgress
from memserve.runner.serve import build_app, fit_to_reservation
from memserve.runner.threads import on_fresh_thread
from tests.runner.fakes import cpu_plan


def test_work_runs_on_another_thread_that_has_ended_when_it_returns() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert on_fresh_thread(work, name="memserve-load") == 42
    assert seen[0] is not threading.main_thread()
    assert seen[0].name == "memserve-load"
    assert seen[0].daemon  # Ctrl-C while loading exits; the library thread it starts is a daemon too
    assert not seen[0].is_alive()  # its OpenMP team is back in libgomp's pool


def test_an_exception_in_the_work_is_raised_in_the_caller() -> None:
    def work() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        on_fresh_thread(work, name="t")


# ----------------------------------------------------------------------------------------------------------
# Holding to the plan: the worst-case warm-up against the reservation


class WarmUpEngine:
    """Stands in for an engine: its worst-case warm-up records itself; the peaks come from ``peaks``."""

    def __init__(self, name: str, sequences: int) -> None:
        self.name = name
        self.sequences = sequences
        self.warm_ups = 0

    def warm_up_worst_case(self) -> dict[str, Any]:
        self.warm_ups += 1
        return {"prompt_tokens": 2048, "measured_sequences": 1, "touched_bytes": 0, "seconds": 0.0}


def plan_for(
    concurrency: int, total_bytes: int, kv_bytes: int, *, reserved_bytes: dict[str, int] | None = None
) -> PlanFile:
    need = DeviceNeed(weights_bytes=total_bytes - kv_bytes, kv_cache_bytes=kv_bytes)
    plan = cpu_plan(context_tokens=2048, concurrency=concurrency, max_batch_tokens=2048, devices={"cpu": need})
    return PlanFile("/models/m", plan, reserved_bytes=reserved_bytes)


@pytest.fixture
def peaks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The measured cpu peaks, one per warm-up, in order (the last one repeats)."""
    values: list[int] = []
    calls = {"n": 0}

    def fake() -> dict[str, int]:
        value = values[min(calls["n"], len(values) - 1)]
        calls["n"] += 1
        return {"cpu": value}

    monkeypatch.setattr(serve, "_peaks", fake)
    monkeypatch.setattr(serve, "reset_peak_rss", lambda: True)
    return values


def check(plan: PlanFile, engine: WarmUpEngine) -> tuple[Any, LoadReport, list[dict[str, Any]], list[int]]:
    report = LoadReport()
    stream = io.StringIO()
    rebuilt: list[int] = []

    def rebuild(sequences: int) -> WarmUpEngine:
        rebuilt.append(sequences)
        return WarmUpEngine(engine.name, sequences)

    result = fit_to_reservation(engine, plan, report, rebuild, progress=LoadProgress(stream=stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    return result, report, events, rebuilt


def test_a_runner_inside_its_reservation_keeps_what_it_admits(peaks: list[int]) -> None:
    peaks.append(900)
    engine = WarmUpEngine("continuous-batching", 8)
    result, report, events, rebuilt = check(plan_for(8, 1000, 800), engine)
    assert result is engine and engine.warm_ups == 1 and rebuilt == []
    assert report.plan_check["fits"] is True
    assert report.plan_check["sequences"] == report.plan_check["planned_sequences"] == 8
    assert report.plan_check["peak_bytes"] == {"cpu": 900}
    assert "needs_bytes" not in report.plan_check
    assert [e["phase"] for e in events] == [WORST_CASE_PHASE]
    assert events[0]["fits"] is True and events[0]["reserved_bytes"] == {"cpu": 1000}


def test_a_runner_over_its_reservation_admits_fewer_sequences_and_measures_again(peaks: list[int]) -> None:
    peaks.extend([1150, 950])  # 150 over; each sequence's KV cache is 100: two fewer sequences
    result, report, events, rebuilt = check(plan_for(8, 1000, 800), WarmUpEngine("continuous-batching", 8))
    assert rebuilt == [6]
    assert isinstance(result, WarmUpEngine) and result.sequences == 6 and result.warm_ups == 1
    assert report.plan_check["fits"] is True
    assert report.plan_check["sequences"] == 6
    assert [t["peak_bytes"]["cpu"] for t in report.plan_check["tries"]] == [1150, 950]
    assert events[0]["sequences"] == 6 and events[0]["planned_sequences"] == 8


def test_a_runner_that_cannot_fit_even_one_sequence_reports_what_it_needs(peaks: list[int]) -> None:
    peaks.extend([1500, 1300])
    _, report, events, rebuilt = check(plan_for(4, 1000, 400), WarmUpEngine("continuous-batching", 4))
    assert rebuilt == [1]
    assert report.plan_check["fits"] is False
    assert report.plan_check["needs_bytes"] == {"cpu": 1300}  # the pool must reserve this before traffic
    assert events[0]["needs_bytes"] == {"cpu": 1300}


def test_the_generate_fallback_adds_the_kv_cache_of_the_rows_it_did_not_run(peaks: list[int]) -> None:
    peaks.append(900)  # one row measured; three more rows of 100 each would make it 1200
    _, report, _, rebuilt = check(plan_for(4, 1000, 400), WarmUpEngine("generate", 4))
    assert report.plan_check["tries"][0]["peak_bytes"] == {"cpu": 1200}
    assert rebuilt == [2] and report.plan_check["sequences"] == 2
    assert report.plan_check["peak_bytes"] == {"cpu": 1000}  # one row measured again, one row's KV added


def test_the_pools_reservation_wins_over_the_estimate(peaks: list[int]) -> None:
    peaks.append(1100)
    plan = plan_for(8, 1000, 800, reserved_bytes={"cpu": 1200})  # calibrated above the estimate
    assert plan.reservation_bytes == {"cpu": 1200}
    assert plan_for(8, 1000, 800).reservation_bytes == {"cpu": 1000}
    _, report, _, rebuilt = check(plan, WarmUpEngine("continuous-batching", 8))
    assert report.plan_check["fits"] is True and rebuilt == []


def tiny_plan(folder: Path, **limits: Any) -> PlanFile:
    """The tiny demo model at 256 × 2 with all the memory it could want (unless ``reserved_bytes`` says less)."""
    need = DeviceNeed(weights_bytes=(64 << 30) - (1 << 20), kv_cache_bytes=1 << 20)
    plan = cpu_plan(concurrency=2, devices={"cpu": need})
    return PlanFile(str(folder), plan, **limits)


def test_a_real_runner_runs_its_worst_case_warm_up_and_reports_it(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_app(tiny_plan(tiny_model_dir), name="tiny")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    phase = next(e for e in events if e.get("phase") == WORST_CASE_PHASE)
    ready = next(e for e in events if e.get("event") == "ready")
    assert phase["fits"] is True and phase["sequences"] == 2
    assert ready["plan_check"]["prompt_tokens"] == 128
    assert ready["plan_check"]["peak_bytes"]["cpu"] >= ready["memory"]["cpu"]["rss_bytes"] // 2


def test_a_real_runner_given_too_small_a_reservation_shrinks_and_says_what_it_needs(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_app(tiny_plan(tiny_model_dir, reserved_bytes={"cpu": 1 << 20}), name="tiny")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    ready = next(e for e in events if e.get("event") == "ready")
    assert ready["engine"] == "continuous-batching"
    assert ready["plan_check"]["sequences"] == 1 and ready["plan_check"]["fits"] is False
    assert ready["plan_check"]["needs_bytes"]["cpu"] > 1 << 20


def test_a_plan_for_the_generate_engine_is_served_by_it(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(serve.ENGINE_ENV, raising=False)
    launch = tiny_plan(tiny_model_dir)
    build_app(dataclasses.replace(launch, plan=dataclasses.replace(launch.plan, engine="generate")), name="tiny")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    ready = next(e for e in events if e.get("event") == "ready")
    assert ready["engine"] == "generate" and ready["plan_check"]["fits"] is True


def test_memserve_engine_generate_serves_with_the_generate_engine(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(serve.ENGINE_ENV, "generate")
    build_app(tiny_plan(tiny_model_dir), name="tiny")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    ready = next(e for e in events if e.get("event") == "ready")
    assert ready["engine"] == "generate" and ready["plan_check"]["fits"] is True


@pytest.mark.parametrize(("max_queue", "queue"), [(None, 4 * 8), (3, 3)])
def test_the_runner_sizes_its_engine_queue_from_the_plan_file(
    monkeypatch: pytest.MonkeyPatch, max_queue: int | None, queue: int
) -> None:
    """The pool writes the model's max_queue into the plan file; the engine admits that many waiting requests."""
    import memserve.runner.app
    import memserve.runner.engine

    made: list[dict[str, Any]] = []

    class Model:
        class generation_config:  # stands in for transformers' GenerationConfig
            eos_token_id = 2

    def make_engine(model: Any, **sizes: Any) -> tuple[WarmUpEngine, None]:
        made.append(sizes)
        return WarmUpEngine("continuous-batching", sizes["max_sequences"]), None

    monkeypatch.setattr(serve, "load_model", lambda source, plan, report: (Model(), object()))
    monkeypatch.setattr(serve, "fit_to_reservation", lambda engine, launch, report, rebuild: engine)
    monkeypatch.setattr(memserve.runner.engine, "make_engine", make_engine)
    monkeypatch.setattr(memserve.runner.app, "create_app", lambda **kwargs: kwargs)
    monkeypatch.setattr(serve, "emit", lambda event: None)
    launch = plan_for(8, 1000, 800)
    build_app(PlanFile(launch.source, launch.plan, max_queue=max_queue), name="m")
    assert made == [
        {
            "prefer": "continuous-batching",
            "max_sequences": 8,
            "max_queue": queue,
            "max_context_tokens": 2048,
            "max_batch_tokens": 2048,
        }
    ]
