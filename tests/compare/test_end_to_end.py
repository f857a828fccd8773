"""``memserve compare`` against a real gateway with two tiny demo models and a generated question set:
the report files agree with the outputs, the budget that holds one model makes it unload, and a compare
stopped halfway through a model resumes without asking again what was answered."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from memserve.cli import main
from memserve.compare.questions import make_questions, read_questions, write_questions
from memserve.compare.report import answer_text
from memserve.compare.scorers import contains
from memserve.compare.streaming import TIMING_FIELD
from tests.gateway.test_gateway_process import gateway, host, local, room_for_one, settings_for

QUESTIONS = 24
MODELS = ("llama", "qwen")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(origin: str, questions: Path, report: Path) -> Any:
    args = ["compare", str(questions), "--url", origin, "--report", str(report), "--max-tokens", "6"]
    args += ["--concurrency", "2", "--scorer", "contains"] + [a for m in MODELS for a in ("--model", m)]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_compare_two_models_report_agrees_with_outputs_and_resumes(
    tmp_path: Path, tiny_model_dir: Path, tiny_qwen_dir: Path
) -> None:
    questions = tmp_path / "questions.jsonl"
    write_questions(make_questions(QUESTIONS), questions)
    report = tmp_path / "report"
    settings = settings_for(tmp_path, [local("llama", tiny_model_dir), local("qwen", tiny_qwen_dir)])
    budget = room_for_one(tiny_model_dir, tiny_qwen_dir)
    with gateway(settings, host(budget)) as (origin, _pool):
        result = compare(origin, questions, report)
        assert result.exit_code == 0, result.output
        assert "the budget holds one of these models at a time: unloading llama before qwen" in result.output

        expected = {q.id: q.answer for q in read_questions(questions)}
        data = json.loads((report / "report.json").read_text())
        rows = {r["model"]: r for r in data["models"]}
        assert list(rows) == list(MODELS)
        with (report / "report.csv").open() as handle:
            csv_rows = {r["model"]: r for r in csv.DictReader(handle)}
        assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for model in MODELS:
            outputs = lines(report / "outputs" / f"{model}.jsonl")
            assert sorted(o["custom_id"] for o in outputs) == sorted(expected)  # every question once
            correct = sum(contains(answer_text(o["response"]["body"]), expected[o["custom_id"]]) for o in outputs)
            tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
            row = rows[model]
            assert (row["questions"], row["answered"], row["correct"]) == (QUESTIONS, QUESTIONS, correct)
            assert row["completion_tokens"] == tokens > 0
            assert row["success_low"] <= row["success_rate"] <= row["success_high"]
            assert row["failures"] == ({"wrong_answer": QUESTIONS - correct} if correct < QUESTIONS else {})
            assert 0 < row["ttft_p50_seconds"] <= row["e2e_p50_seconds"]
            assert row["tokens_per_second"] > 0 and row["peak_measured_bytes"] > 0 and row["load_seconds"] > 0
            assert int(csv_rows[model]["correct"]) == correct
            assert float(csv_rows[model]["tokens_per_second"]) == row["tokens_per_second"]

        # Stop "halfway through qwen": keep its first 10 answers and half a line, as a kill -9 leaves them.
        qwen = report / "outputs" / "qwen.jsonl"
        kept = qwen.read_text().splitlines(keepends=True)[:10]
        qwen.write_text("".join(kept) + kept[0][: len(kept[0]) // 2])
        result = compare(origin, questions, report)
        assert result.exit_code == 0, result.output
        assert "llama: all 24 answers are in" in result.output
        assert "qwen: resuming, 10 of 24 answered already" in result.output
        resumed = lines(qwen)
        assert sorted(o["custom_id"] for o in resumed) == sorted(expected)
        assert resumed[:10] == [json.loads(line) for line in kept]  # what was answered is not asked again
        assert all(TIMING_FIELD in o["response"]["body"] for o in resumed)
        rows = {r["model"]: r for r in json.loads((report / "report.json").read_text())["models"]}
        assert rows["qwen"]["answered"] == QUESTIONS
