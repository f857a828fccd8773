"""How a run is shown and kept: a live view (rich on a terminal, plain lines otherwise), tables, JSON and a plot.

Latencies are printed in milliseconds and stored in seconds (JSON names end in ``_seconds``).
matplotlib is imported only by ``write_plot`` (the ``plot`` extra), through its object API and the Agg
canvas, so no global backend is switched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from memserve.bench.load import Target
from memserve.bench.run import BenchReport, TargetResult, ratio
from memserve.bench.stats import Percentiles, RequestRecord, Step, StepStats
from memserve.errors import InvalidArgument

__all__ = [
    "LiveReporter",
    "PlainReporter",
    "comparison_table",
    "require_matplotlib",
    "results_table",
    "step_line",
    "write_json",
    "write_plot",
]

PLOT_EXTRA_HINT = "pip install 'memserve[plot]'"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _p(p: Percentiles | None, which: str) -> float | None:
    return None if p is None else float(getattr(p, which))


def step_line(target: Target, stats: StepStats) -> str:
    """``A @ 4 concurrent: 16 ok, 0 failed, 3.2 req/s, 205 out tok/s, TTFT p50 123.0 ms ...``."""
    failed = f", errors {dict(stats.errors)}" if stats.errors else ""
    return (
        f"{target.name} @ {stats.step.label()}: {stats.successful_requests} ok, {stats.failed_requests} failed"
        f"{failed}, {stats.requests_per_second:.2f} req/s, {stats.output_tokens_per_second:.1f} out tok/s, "
        f"TTFT p50 {_ms(_p(stats.ttft_seconds, 'p50'))} ms p99 {_ms(_p(stats.ttft_seconds, 'p99'))} ms, "
        f"TPOT p50 {_ms(_p(stats.tpot_seconds, 'p50'))} ms"
    )


class PlainReporter:
    """One line per step and per note, for logs and pipes."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def step_started(self, target: Target, step: Step, max_requests: int | None) -> None:
        pass

    def request_done(self, target: Target, record: RequestRecord) -> None:
        pass

    def step_finished(self, target: Target, stats: StepStats) -> None:
        self.echo(step_line(target, stats))

    def note(self, message: str) -> None:
        self.echo(message)


class LiveReporter:
    """A rich progress bar per step on a terminal; finished steps stay as lines above it."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None
        self.failed = 0

    def __enter__(self) -> LiveReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def step_started(self, target: Target, step: Step, max_requests: int | None) -> None:
        self.failed = 0
        self.task = self.progress.add_task(f"{target.name} @ {step.label()}", total=max_requests, failed=0)

    def request_done(self, target: Target, record: RequestRecord) -> None:
        if self.task is None:
            return
        self.failed += 0 if record.ok else 1
        self.progress.update(self.task, advance=1, failed=self.failed)

    def step_finished(self, target: Target, stats: StepStats) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(step_line(target, stats), highlight=False)

    def note(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


def _new_table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def results_table(result: TargetResult) -> Table:
    """One row per step: counts, throughput, latency percentiles in ms."""
    table = _new_table(result.target.describe())
    columns = (
        "step",
        "ok",
        "failed",
        "req/s",
        "out tok/s",
        "prompt tok",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "TPOT p50",
        "E2E p50",
        "E2E p99",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "step" else "right")
    for s in result.steps:
        prompt = (
            "-"
            if s.prompt_tokens is None or not s.successful_requests
            else f"{s.prompt_tokens / s.successful_requests:.0f}"
        )
        table.add_row(
            s.step.label(),
            str(s.successful_requests),
            _failed_cell(s),
            f"{s.requests_per_second:.2f}",
            f"{s.output_tokens_per_second:.1f}",
            prompt,
            _ms(_p(s.ttft_seconds, "p50")),
            _ms(_p(s.ttft_seconds, "p99")),
            _ms(_p(s.itl_seconds, "p50")),
            _ms(_p(s.itl_seconds, "p99")),
            _ms(_p(s.tpot_seconds, "p50")),
            _ms(_p(s.e2e_seconds, "p50")),
            _ms(_p(s.e2e_seconds, "p99")),
        )
    table.caption = "latencies in ms; prompt tok = mean per request"
    table.caption_justify = "left"
    return table


def _failed_cell(stats: StepStats) -> str:
    if not stats.errors:
        return "0"
    return ", ".join(f"{kind} {count}" for kind, count in stats.errors.items())


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def comparison_table(a: TargetResult, b: TargetResult) -> Table:
    """A and B side by side per step, with B ÷ A for throughput, TTFT p50 and TPOT p50."""
    table = _new_table(
        f"B ÷ A   (A = {a.target.model} at {a.target.base_url}; B = {b.target.model} at {b.target.base_url})"
    )
    for column in (
        "step",
        "A tok/s",
        "B tok/s",
        "B÷A",
        "A TTFT p50",
        "B TTFT p50",
        "B÷A ",
        "A TPOT p50",
        "B TPOT p50",
        "B÷A  ",
    ):
        table.add_column(column, justify="left" if column == "step" else "right")
    for sa, sb in zip(a.steps, b.steps, strict=False):  # B may have stopped early
        ta, tb = _p(sa.ttft_seconds, "p50"), _p(sb.ttft_seconds, "p50")
        pa, pb = _p(sa.tpot_seconds, "p50"), _p(sb.tpot_seconds, "p50")
        table.add_row(
            sa.step.label(),
            f"{sa.output_tokens_per_second:.1f}",
            f"{sb.output_tokens_per_second:.1f}",
            _ratio_cell(ratio(sb.output_tokens_per_second, sa.output_tokens_per_second)),
            _ms(ta),
            _ms(tb),
            _ratio_cell(ratio(tb, ta)),
            _ms(pa),
            _ms(pb),
            _ratio_cell(ratio(pb, pa)),
        )
    table.caption = "B÷A > 1: B has more tokens/s, or slower latencies; latencies in ms"
    table.caption_justify = "left"
    return table


def write_json(path: Path, report: BenchReport) -> None:
    """Write the report atomically (a reader never sees half a file), creating the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_matplotlib() -> None:
    """Fail before the run, not after it, when ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InvalidArgument(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}") from exc


_LATENCIES = (
    ("ttft_seconds", "p50", "TTFT p50", "-"),
    ("ttft_seconds", "p99", "TTFT p99", ":"),
    ("tpot_seconds", "p50", "TPOT p50", "--"),
)


def write_plot(path: Path, results: Sequence[TargetResult]) -> None:
    """Latency (TTFT p50/p99, TPOT p50, ms) and output tokens/s against the steps, one colour per target."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    latency, throughput = figure.subplots(1, 2)
    kind = next((r.steps[0].step.kind for r in results if r.steps), "concurrency")
    for index, result in enumerate(results):
        colour = f"C{index}"
        xs = [s.step.value for s in result.steps]
        for attribute, which, label, style in _LATENCIES:
            known = [
                (s.step.value, v * 1e3) for s in result.steps if (v := _p(getattr(s, attribute), which)) is not None
            ]
            if known:
                latency.plot(
                    [x for x, _ in known],
                    [y for _, y in known],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{result.target.name} {label}",
                )
        throughput.plot(
            xs,
            [s.output_tokens_per_second for s in result.steps],
            "-",
            marker="o",
            color=colour,
            label=result.target.describe(),
        )
    x_label = "concurrent requests" if kind == "concurrency" else "arrival rate (requests/s)"
    ticks = sorted({s.step.value for r in results for s in r.steps})
    _axes(latency, x_label, "latency (ms)", kind, ticks)
    _axes(throughput, x_label, "output tokens/s", kind, ticks)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _axes(axes: Any, x_label: str, y_label: str, kind: str, ticks: list[float]) -> None:
    if kind == "concurrency":
        axes.set_xscale("log", base=2)
    if ticks:
        axes.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        axes.minorticks_off()
    axes.set_ylim(bottom=0)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
