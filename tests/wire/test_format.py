"""The wire format's pieces that both apps, the fake server and the CLI share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import BaseModel

from memserve.errors import InvalidArgument, MemoryBusy, Overloaded, error_body
from memserve.wire.format import SSE_DONE, error_json, param_path, parse_body, retry_after, sse_event
from memserve.wire.http import error_response


class Message(BaseModel):
    role: str
    content: str


class Body(BaseModel):
    messages: list[Message]


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (("messages", 0, "content"), "messages[0].content"),
        (("body",), None),
        (("model",), "model"),
        (("a", 0, 1, "b"), "a[0][1].b"),
    ],
)
def test_param_is_written_as_openai_writes_it(loc: tuple[int | str, ...], param: str | None) -> None:
    assert param_path(loc) == param


def test_a_validation_error_names_the_field_in_that_format() -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_body(Body, {"messages": [{"role": "user", "content": 5}]})
    assert raised.value.param == "messages[0].content"
    assert "invalid value for 'messages[0].content'" in raised.value.message


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3"), (7, "7")])
def test_retry_after_is_whole_seconds_rounded_up_and_never_zero(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


@pytest.mark.parametrize("exc", [Overloaded("full", retry_after_seconds=2.5), MemoryBusy("busy")])
def test_an_error_that_says_when_to_retry_gets_retry_after(exc: Overloaded | MemoryBusy) -> None:
    response = error_response(exc)
    assert response.status_code == exc.status_code
    assert response.headers["retry-after"] == retry_after(exc.retry_after_seconds)
    assert json.loads(response.body) == exc.to_openai() == error_json(exc)


def test_anything_else_is_a_500_in_the_same_shape() -> None:
    body = error_json(KeyError("plan"))
    assert body == error_body(500, "internal error: KeyError: 'plan'")
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == "api_error"
    response = error_response(KeyError("plan"))
    assert response.status_code == 500 and "retry-after" not in response.headers
    assert InvalidArgument("bad", param="n").to_openai() == error_body(400, "bad", param="n", code="invalid_argument")


def test_an_sse_event_is_one_line_of_compact_json() -> None:
    assert sse_event({"text": "héllo\nworld", "n": [1, 2]}) == 'data: {"text":"héllo\\nworld","n":[1,2]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_the_format_module_costs_no_web_framework() -> None:
    """The CLI and ``memserve bench`` use it; FastAPI's import would slow down every command."""
    code = (
        "import sys, memserve.wire.format, memserve.wire.routes\n"
        "print(sorted({'fastapi', 'starlette', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
