"""Rendering: the live view on a (fake) terminal, the tables, the JSON file and the plot."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from memserve.bench.load import Target
from memserve.bench.prompts import SyntheticPrompts
from memserve.bench.report import (
    LiveReporter,
    comparison_table,
    require_matplotlib,
    results_table,
    write_json,
    write_plot,
)
from memserve.bench.run import BenchConfig, BenchReport, TargetResult, run_bench
from memserve.bench.stats import Percentiles, Step, StepKind, StepStats
from memserve.errors import InvalidArgument
from memserve.wire.fake import FakeOpenAI, Script
from tests.bench.virtual import VirtualClock
from tests.serving import StreamingASGITransport


def step(value: float, tokens_per_second: float, ttft: float, tpot: float, kind: StepKind = "concurrency") -> StepStats:
    return StepStats(
        step=Step(kind, value),
        requests=8,
        successful_requests=8,
        errors={},
        error_examples={},
        wall_seconds=2.0,
        requests_per_second=4.0,
        output_tokens_per_second=tokens_per_second,
        output_tokens=100,
        prompt_tokens=800,
        ttft_seconds=Percentiles(ttft, ttft, 2 * ttft),
        itl_seconds=Percentiles(tpot, tpot, tpot),
        tpot_seconds=Percentiles(tpot, tpot, tpot),
        e2e_seconds=Percentiles(1.0, 1.0, 1.0),
    )


def render(table: object) -> str:
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


A = TargetResult(Target("A", "http://a/v1", "small"), [step(1, 100.0, 0.050, 0.010), step(2, 180.0, 0.060, 0.012)])
B = TargetResult(Target("B", "http://b/v1", "other"), [step(1, 150.0, 0.025, 0.020), step(2, 360.0, 0.030, 0.006)])


def test_results_table_shows_milliseconds() -> None:
    text = render(results_table(A))
    assert "A: small at http://a/v1" in text
    row = next(line for line in text.splitlines() if line.startswith("2 concurrent"))
    assert row.split() == [
        "2",
        "concurrent",
        "8",
        "0",
        "4.00",
        "180.0",
        "100",
        "60.0",
        "120.0",
        "12.0",
        "12.0",
        "12.0",
        "1000.0",
        "1000.0",
    ]


def test_comparison_table_divides_b_by_a() -> None:
    text = render(comparison_table(A, B))
    assert "B ÷ A" in text
    row = next(line for line in text.splitlines() if line.startswith("2 concurrent"))
    # tok/s 360/180 = 2.00; TTFT p50 30/60 = 0.50; TPOT p50 6/12 = 0.50
    assert row.split() == ["2", "concurrent", "180.0", "360.0", "2.00", "60.0", "30.0", "0.50", "12.0", "6.0", "0.50"]


def test_the_live_view_runs_on_a_terminal() -> None:
    clock = VirtualClock()
    fake = FakeOpenAI(models=("m",), script=Script(first_token_delays_seconds=(1 / 16,)), sleep=clock.sleep)
    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    config = BenchConfig(
        targets=(Target("A", "http://fake/v1", "m"),),
        steps=(Step("concurrency", 1),),
        requests_per_step=3,
        measure_overhead=False,
    )
    prompts = SyntheticPrompts(prompt_tokens=4, output_tokens=3, seed=0)
    with LiveReporter(console) as live:
        clock.run(
            lambda: run_bench(
                config, prompts, clock=clock, sleep=clock.sleep, reporter=live, transport=StreamingASGITransport(fake)
            )
        )
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "A @ 1 concurrent: 3 ok, 0 failed" in text
    assert "warmed up with 1 request" in text


def test_json_is_replaced_whole(tmp_path: Path) -> None:
    report = BenchReport(BenchConfig(targets=(A.target, B.target), steps=(Step("concurrency", 1),)), {}, [A, B])
    path = tmp_path / "deep" / "r.json"
    write_json(path, report)
    write_json(path, report)
    data = json.loads(path.read_text())
    assert data["comparison"]["steps"][0] == {
        "concurrency": 1,
        "output_tokens_per_second": 1.5,
        "requests_per_second": 1.0,
        "ttft_p50": 0.5,
        "tpot_p50": 2.0,
        "e2e_p50": 1.0,
    }
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary files left behind


def test_plot_of_rates(tmp_path: Path) -> None:
    rates = TargetResult(
        Target("A", "http://a/v1", "m"), [step(0.5, 10.0, 0.1, 0.01, "rate"), step(2.0, 30.0, 0.2, 0.01, "rate")]
    )
    path = tmp_path / "rates.png"
    write_plot(path, [rates])
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(InvalidArgument, match=r"--plot needs matplotlib.*pip install 'memserve\[plot\]'"):
        require_matplotlib()
