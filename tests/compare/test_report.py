"""Questions in, the report out: the question file's bad lines, and a report computed from hand-made
output and errors files (answers, failures by kind, questions never run, timings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from memserve.cli import main
from memserve.compare.questions import make_questions, read_questions, write_batch_input, write_questions
from memserve.compare.report import model_report, plot_report, write_report
from memserve.compare.run import model_info_path, output_path
from memserve.compare.scorers import exact
from memserve.errors import InvalidArgument
from tests.serving import nothing_listening


def write_lines(path: Path, items: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_bad_question_lines_are_named_by_number(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"id": "a", "prompt": "p", "answer": "x"}',
                "{not json",
                '{"id": "a", "prompt": "p", "answer": "x"}',
                '{"id": "b", "answer": "x"}',
                '{"id": "c", "prompt": "p"}',
                '{"id": "d", "prompt": "p", "messages": [{"role": "user", "content": "p"}], "answer": 1}',
                "",
                '{"id": 7, "messages": [{"role": "user", "content": "p"}], "answer": {"k": 1}}',
            ]
        )
    )
    with pytest.raises(InvalidArgument) as raised:
        read_questions(path)
    message = raised.value.message
    assert "has 5 bad line(s): line 2: not valid JSON" in message
    assert "line 3: duplicate id 'a' (first on line 1)" in message
    assert 'line 4: needs either "prompt"' in message and 'line 6: needs either "prompt"' in message
    assert 'line 5: needs "answer"' in message
    assert "line 8" not in message  # a number id and chat messages are fine


def test_questions_become_greedy_chat_batch_lines(tmp_path: Path) -> None:
    questions = write_lines(
        tmp_path / "q.jsonl",
        [
            {"id": 1, "prompt": "hi", "answer": "x"},
            {"id": "m", "messages": [{"role": "user", "content": "yo"}], "answer": "y"},
        ],
    )
    batch = tmp_path / "requests.jsonl"
    write_batch_input(read_questions(questions), batch, max_tokens=5)
    lines = [json.loads(line) for line in batch.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["1", "m"]
    assert lines[0]["body"] == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    assert lines[1]["url"] == "/v1/chat/completions"


def test_generated_questions_are_the_same_for_a_seed_and_mix_common_and_rare_letters(tmp_path: Path) -> None:
    assert make_questions(50) == make_questions(50)
    answers = {q["answer"] for q in make_questions(200)}
    assert {"e", "t"} <= answers and answers & {"q", "x", "z", "j"}
    result = CliRunner().invoke(main, ["compare", "--make-questions", "12", str(tmp_path / "g.jsonl")])
    assert result.exit_code == 0, result.output
    assert len(read_questions(tmp_path / "g.jsonl")) == 12


def answer(qid: str, text: str, tokens: int, start: float, ttft: float, e2e: float) -> dict[str, Any]:
    timing = {"ttft_seconds": ttft, "e2e_seconds": e2e, "started_at": start, "finished_at": start + e2e}
    body = {
        "choices": [{"message": {"content": text}}],
        "usage": {"completion_tokens": tokens},
        "memserve_timing": timing,
    }
    return {"custom_id": qid, "response": {"status_code": 200, "body": body}, "error": None}


def test_the_report_is_computed_from_the_files(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    write_questions([{"id": f"q{i}", "prompt": "p", "answer": "yes"} for i in range(6)], questions)
    report = tmp_path / "report"
    out = output_path(report, "m/one")  # a name with a slash is a safe file name
    assert out.name == "m_one.jsonl"
    write_lines(
        out,
        [
            answer("q0", "yes", 10, start=0.0, ttft=0.1, e2e=1.0),
            answer("q1", "yes", 10, start=0.5, ttft=0.2, e2e=1.5),  # overlaps q0: busy 0–2 s
            answer("q2", "no", 20, start=10.0, ttft=0.3, e2e=2.0),  # after a pause: busy 10–12 s
            answer("gone", "yes", 99, start=50.0, ttft=9.0, e2e=9.0),  # not a question any more: ignored
        ],
    )
    write_lines(
        out.with_name("m_one.errors.jsonl"),
        [
            {"custom_id": "q3", "response": None, "error": {"code": "upstream_unavailable", "message": "x"}},
            {"custom_id": "q4", "response": {"status_code": 400, "body": {}}, "error": None},
        ],
    )
    model_info_path(report, "m/one").write_text(json.dumps({"peak_measured_bytes": 5 << 20, "load_seconds": 1.5}))
    row = model_report("m/one", read_questions(questions), report, exact)
    assert (row.questions, row.answered, row.correct) == (6, 3, 2)
    assert row.success_rate == pytest.approx(2 / 6)
    assert row.failures == {"http_400": 1, "not_run": 1, "upstream_unavailable": 1, "wrong_answer": 1}
    assert row.completion_tokens == 40
    assert row.busy_seconds == pytest.approx(4.0)
    assert row.tokens_per_second == pytest.approx(10.0)
    assert row.ttft_p50_seconds == pytest.approx(0.2) and row.e2e_p90_seconds == pytest.approx(1.9)
    assert (row.peak_measured_bytes, row.load_seconds, row.reserved_bytes) == (5 << 20, 1.5, None)

    paths = write_report([row], report, scorer="exact", questions=questions)
    data = json.loads(paths["json"].read_text())
    assert data["scorer"] == "exact" and data["models"][0]["correct"] == 2
    with paths["csv"].open() as handle:
        (line,) = list(csv.DictReader(handle))
    assert line["failures"] == "http_400=1;not_run=1;upstream_unavailable=1;wrong_answer=1"
    assert float(line["success_low"]) == pytest.approx(row.success_low)
    assert plot_report([row], report / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bad_scorer_is_said_before_anything_runs(tmp_path: Path) -> None:
    questions = write_lines(tmp_path / "q.jsonl", [{"id": 1, "prompt": "hi", "answer": "x"}])
    args = ["compare", str(questions), "--model", "m", "--url", "http://127.0.0.1:9", "--scorer", "nope"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "unknown scorer 'nope'" in result.output


def test_no_gateway_is_one_line_saying_to_start_one(tmp_path: Path) -> None:
    questions = write_lines(tmp_path / "q.jsonl", [{"id": 1, "prompt": "hi", "answer": "x"}])
    with nothing_listening() as url:
        args = ["compare", str(questions), "--model", "m", "--url", url, "--report", str(tmp_path / "r")]
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert (
        "no answer from the gateway at" in result.output and "start it (memserve serve) or fix --url" in result.output
    )
