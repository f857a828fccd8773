"""The batch file format as tables: each bad line named by its number, every problem before anything runs."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from memserve.batch.format import (
    BatchFileInvalid,
    BatchRequest,
    LineProblem,
    error_line,
    is_transient,
    output_line,
    read_requests,
    read_requests_file,
    validate,
)


def chat(custom_id: str, **overrides: Any) -> str:
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(overrides)
    return json.dumps(line)


GOOD = chat("q1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8 text"),
        (GOOD.replace('"custom_id": "q1"', '"custom_id": "q\\ud800"'), "lone UTF-16 surrogate"),
        ('{"custom_id": "q", "deep": ' + "[" * 5000 + "]" * 5000 + "}", "deeper than this server reads"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "custom_id is missing"),
        (chat(""), "custom_id is missing"),
        (json.dumps({**json.loads(GOOD), "custom_id": 7}), "custom_id is missing"),
        (chat("q", method="GET"), "method must be 'POST', got 'GET'"),
        (chat("q", url="/v1/responses"), "url '/v1/responses' is not one of"),
        (chat("q", url="/v1/embeddings"), "body.input is missing"),
        (chat("q", url=None), "url None is not one of"),
        (chat("q", body="text"), "body is missing or not a JSON object"),
        (chat("q", body={"messages": [{"role": "user", "content": "x"}]}), "body.model is missing"),
        (chat("q", body={"model": "m", "messages": []}), "body.messages is missing or empty"),
        (chat("q", body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}), "stream"),
        (chat("q", url="/v1/completions", body={"model": "m"}), "body.prompt is missing"),
    ],
)
def test_each_bad_line_is_named_with_its_number(line: str | bytes, message: str) -> None:
    count, problems = validate([GOOD, line, chat("q3")])
    assert count == 3
    assert len(problems) == 1
    assert problems[0].line == 2
    assert message in problems[0].message
    assert str(problems[0]).startswith("line 2: ")


def test_duplicates_name_the_first_line_and_every_repeat() -> None:
    _, problems = validate([chat("a"), chat("b"), chat("a"), "", chat("a")])
    assert problems == [
        LineProblem(3, "duplicate custom_id 'a' (first on line 1)"),
        LineProblem(5, "duplicate custom_id 'a' (first on line 1)"),
    ]


def test_blank_lines_are_skipped_but_keep_the_numbering() -> None:
    requests = list(
        read_requests(["", GOOD, "   ", chat("q2", url="/v1/completions", body={"model": "m", "prompt": "x"})])
    )
    assert [(r.line, r.custom_id, r.url) for r in requests] == [
        (2, "q1", "/v1/chat/completions"),
        (4, "q2", "/v1/completions"),
    ]


def test_model_replaces_the_bodys_and_makes_it_optional() -> None:
    lines = [chat("a", body={"messages": [{"role": "user", "content": "x"}]}), chat("b")]
    assert validate(lines)[1][0].line == 1
    requests = list(read_requests(lines, model="tiny"))
    assert [r.body["model"] for r in requests] == ["tiny", "tiny"]


def test_every_problem_is_raised_before_the_first_request() -> None:
    lines = [GOOD] + ["{bad"] * 25 + [chat("q1")]
    with pytest.raises(BatchFileInvalid) as info:
        read_requests(lines)
    error = info.value
    assert len(error.problems) == 26 and error.lines_total == 27
    assert error.status_code == 400 and error.error_type == "invalid_request_error"
    assert "26 bad line(s) of 27" in error.message
    assert "line 21: " in error.message and "line 22: " not in error.message
    assert "and 6 more" in error.message


def test_a_seekable_file_is_checked_then_streamed_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(chat(f"q{i}") for i in range(5)) + "\n")
    assert [r.custom_id for r in read_requests_file(path)] == [f"q{i}" for i in range(5)]
    with path.open("rb") as handle:
        assert len(list(read_requests(handle))) == 5


def test_a_one_shot_iterator_is_refused_rather_than_read_unchecked() -> None:
    with pytest.raises(TypeError, match="re-iterable"):
        read_requests(iter([GOOD]))


def test_a_file_of_100k_lines_is_checked_in_one_pass(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w") as out:
        for i in range(100_000):
            out.write(chat(f"q{i}") + "\n")
    with path.open("rb") as handle:
        assert validate(handle) == (100_000, [])


REQUEST = BatchRequest(line=1, custom_id="q1", method="POST", url="/v1/chat/completions", body={"model": "m"})


def test_output_and_error_lines_have_openais_shape() -> None:
    assert output_line(REQUEST, status_code=200, body={"x": 1}, request_id="r1", batch_request_id="b1") == {
        "id": "b1",
        "custom_id": "q1",
        "response": {"status_code": 200, "request_id": "r1", "body": {"x": 1}},
        "error": None,
    }
    answered = error_line(
        REQUEST, code="invalid_argument", message="bad", batch_request_id="b2", status_code=400, body={"error": {}}
    )
    assert answered["response"] == {"status_code": 400, "request_id": "", "body": {"error": {}}}
    assert answered["error"] is None
    unanswered = error_line(REQUEST, code="upstream_unavailable", message="refused", batch_request_id="b3")
    assert unanswered["response"] is None
    assert unanswered["error"] == {"code": "upstream_unavailable", "message": "refused"}


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (None, True),
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (501, False),
        (400, False),
        (401, False),
        (404, False),
        (413, False),
        (200, False),
    ],
)
def test_is_transient(status: int | None, transient: bool) -> None:
    assert is_transient(status) is transient


def test_read_requests_accepts_bytes_io() -> None:
    assert [r.custom_id for r in read_requests(io.BytesIO((GOOD + "\n").encode()))] == ["q1"]
