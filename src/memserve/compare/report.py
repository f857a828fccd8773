"""The report: per model, from its output and errors files, scored; as a table, JSON, CSV and a plot.

Everything is computed from the files a compare wrote (the outputs are the truth, as in a batch), so a
report can be rebuilt at any time, with another scorer, without running a model again.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memserve.batch.checkpoint import errors_path_for
from memserve.compare.questions import Question
from memserve.compare.run import _read_json, model_info_path, output_path
from memserve.compare.scorers import Scorer
from memserve.compare.stats import busy_seconds, percentile, wilson_interval
from memserve.compare.streaming import TIMING_FIELD
from memserve.errors import InvalidArgument

WRONG = "wrong_answer"
NOT_RUN = "not_run"


@dataclass
class ModelReport:
    """One model's row: every rate is over all the questions (an unanswered one counts as a failure)."""

    model: str
    questions: int
    answered: int
    correct: int
    success_rate: float
    success_low: float
    success_high: float
    ttft_p50_seconds: float | None
    ttft_p90_seconds: float | None
    ttft_p99_seconds: float | None
    e2e_p50_seconds: float | None
    e2e_p90_seconds: float | None
    e2e_p99_seconds: float | None
    completion_tokens: int
    busy_seconds: float
    tokens_per_second: float | None
    peak_measured_bytes: int | None
    reserved_bytes: int | None
    load_seconds: float | None
    failures: dict[str, int] = field(default_factory=dict)


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open("rb") as handle:
        for raw in handle:
            if raw.endswith(b"\n") and raw.strip():
                yield json.loads(raw)


def answer_text(body: dict[str, Any]) -> str:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message")
    return str(message.get("content") or "") if isinstance(message, dict) else str(choice.get("text") or "")


def model_report(model: str, questions: list[Question], report_dir: Path, scorer: Scorer) -> ModelReport:
    expected = {q.id: q.answer for q in questions}
    out = output_path(report_dir, model)
    failures: Counter[str] = Counter()
    answered = correct = tokens = 0
    ttfts: list[float] = []
    e2es: list[float] = []
    spans: list[tuple[float, float]] = []
    seen: set[str] = set()
    for line in _lines(out):
        qid = line["custom_id"]
        if qid not in expected:
            continue  # a question removed from the file since
        seen.add(qid)
        body = line["response"]["body"]
        answered += 1
        if scorer(answer_text(body), expected[qid]):
            correct += 1
        else:
            failures[WRONG] += 1
        tokens += int((body.get("usage") or {}).get("completion_tokens") or 0)
        timing = body.get(TIMING_FIELD) or {}
        if timing.get("ttft_seconds") is not None:
            ttfts.append(float(timing["ttft_seconds"]))
        if timing.get("e2e_seconds") is not None:
            e2es.append(float(timing["e2e_seconds"]))
        if timing.get("started_at") is not None and timing.get("finished_at") is not None:
            spans.append((float(timing["started_at"]), float(timing["finished_at"])))
    for line in _lines(errors_path_for(out)):
        if line["custom_id"] in expected:
            seen.add(line["custom_id"])
            failures[
                str((line.get("error") or {}).get("code") or f"http_{(line.get('response') or {}).get('status_code')}")
            ] += 1
    if len(seen) < len(expected):
        failures[NOT_RUN] += len(expected) - len(seen)
    busy = busy_seconds(spans)
    info = _read_json(model_info_path(report_dir, model))
    low, high = wilson_interval(correct, len(questions))
    return ModelReport(
        model=model,
        questions=len(questions),
        answered=answered,
        correct=correct,
        success_rate=correct / len(questions),
        success_low=low,
        success_high=high,
        ttft_p50_seconds=percentile(ttfts, 50),
        ttft_p90_seconds=percentile(ttfts, 90),
        ttft_p99_seconds=percentile(ttfts, 99),
        e2e_p50_seconds=percentile(e2es, 50),
        e2e_p90_seconds=percentile(e2es, 90),
        e2e_p99_seconds=percentile(e2es, 99),
        completion_tokens=tokens,
        busy_seconds=busy,
        tokens_per_second=tokens / busy if busy > 0 else None,
        peak_measured_bytes=info.get("peak_measured_bytes"),
        reserved_bytes=info.get("reserved_bytes"),
        load_seconds=info.get("load_seconds"),
        failures=dict(sorted(failures.items())),
    )


CSV_FIELDS = [f for f in ModelReport.__dataclass_fields__ if f != "failures"] + ["failures"]


def write_report(rows: list[ModelReport], report_dir: Path, *, scorer: str, questions: Path) -> dict[str, Path]:
    """``report.json`` and ``report.csv`` (and ``report.png`` when matplotlib is installed) in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": report_dir / "report.json", "csv": report_dir / "report.csv"}
    paths["json"].write_text(
        json.dumps({"questions": str(questions), "scorer": scorer, "models": [asdict(r) for r in rows]}, indent=2)
        + "\n"
    )
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            row = asdict(r)
            row["failures"] = ";".join(f"{k}={v}" for k, v in r.failures.items())
            writer.writerow(row)
    return paths


def plot_report(rows: list[ModelReport], path: Path) -> Path:
    """Success (with its Wilson interval) against tokens/s; a marker's area is the model's peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgument(
            "the plot needs matplotlib: pip install 'memserve[plot]' (or pass --no-plot)", param="plot"
        ) from None
    peak = max((r.peak_measured_bytes or 0) for r in rows) or 1
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for r in rows:
        x = r.tokens_per_second or 0.0
        size = 80 + 1200 * (r.peak_measured_bytes or 0) / peak
        axes.errorbar(
            x,
            r.success_rate,
            yerr=[[r.success_rate - r.success_low], [r.success_high - r.success_rate]],
            fmt="none",
            ecolor="grey",
            capsize=4,
            zorder=1,
        )
        axes.scatter([x], [r.success_rate], s=size, alpha=0.6, zorder=2)
        mib = (r.peak_measured_bytes or 0) / (1 << 20)
        axes.annotate(f"{r.model}\n{mib:.0f} MiB", (x, r.success_rate), textcoords="offset points", xytext=(10, 6))
    axes.set_xlabel("tokens/s (completion tokens over busy time)")
    axes.set_ylabel("success rate (Wilson 95 % interval)")
    axes.set_ylim(0, 1)
    axes.set_xlim(0, 1.3 * max((r.tokens_per_second or 0.0) for r in rows) or 1.0)  # room for the labels
    axes.set_title("memserve compare: marker area = peak measured memory")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def table(rows: list[ModelReport]) -> Any:
    """A rich table of the rows (rich is imported here: the report module stays cheap to import)."""
    from rich.table import Table

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"

    out = Table(title="memserve compare")
    for name in (
        "model",
        "success (95 % CI)",
        "TTFT p50/p90",
        "E2E p50/p90",
        "tokens/s",
        "peak memory",
        "load",
        "failures",
    ):
        out.add_column(name, justify="left" if name in ("model", "failures") else "right")
    for r in rows:
        out.add_row(
            r.model,
            f"{r.correct}/{r.questions} {r.success_rate:.0%} ({r.success_low:.0%}–{r.success_high:.0%})",
            f"{secs(r.ttft_p50_seconds)} / {secs(r.ttft_p90_seconds)}",
            f"{secs(r.e2e_p50_seconds)} / {secs(r.e2e_p90_seconds)}",
            "-" if r.tokens_per_second is None else f"{r.tokens_per_second:.1f}",
            "-" if r.peak_measured_bytes is None else f"{r.peak_measured_bytes / (1 << 20):.0f} MiB",
            secs(r.load_seconds),
            ", ".join(f"{k} {v}" for k, v in r.failures.items()) or "-",
        )
    return out


__all__ = ["ModelReport", "answer_text", "model_report", "plot_report", "table", "write_report"]
