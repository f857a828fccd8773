"""OpenAI's batch file format: input lines read and checked, output and error lines written.

The CLI (``memserve batch run``) and the gateway (``/v1/batches``) read and write the same lines, so
a file that works with OpenAI's Batch API works with either, and their results read alike.

Input, one JSON object a line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., ...}}

Every problem in a file is found in one pass before anything runs (:func:`validate`), with line
numbers, so a bad line 9,000 never stops a batch halfway. Output lines (one per finished request)::

    {"id": "batch_req_…", "custom_id": "q1", "response": {"status_code": 200, "request_id": "…", "body": {…}},
     "error": null}

and the errors file holds the requests that failed: an HTTP error answer in ``response`` (as OpenAI
writes a 400 from the model), or ``response: null`` with ``error: {"code", "message"}`` when there
was no answer at all (retries spent on a connection that never answered).

Torch-free and without gateway or pool imports: both processes read it.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument
from memserve.wire.http import client_json

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")  # those of OpenAI's Batch API we serve
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class BatchRequest:
    """One checked input line; ``line`` is its 1-based line number in the file."""

    line: int
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineProblem:
    """Why one input line cannot run; ``str()`` is the sentence shown to the user."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class BatchFileInvalid(InvalidArgument):
    """A batch input file has lines that cannot run; every one is listed (the first 20 and a count)."""

    code = "invalid_batch_file"

    def __init__(self, problems: list[LineProblem], *, lines_total: int, name: str = "the batch file") -> None:
        shown = "; ".join(str(p) for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(
            f"{name} has {len(problems)} bad line(s) of {lines_total}: {shown}{more}; "
            "fix them (each line is one JSON object with custom_id, method POST, url and body) and run it again",
            param="input_file",
        )
        self.problems = problems
        self.lines_total = lines_total


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def check_line(number: int, raw: bytes | str, *, model: str | None = None) -> BatchRequest | LineProblem | None:
    """One input line as a request, the problem with it, or ``None`` for a blank line (skipped).

    ``model``, when given, is the model every request runs on (it replaces the body's ``model``), so
    the body need not name one.
    """
    try:
        text = _text(raw)
    except UnicodeDecodeError:
        return LineProblem(number, "not UTF-8 text")
    if not text.strip():
        return None
    try:
        obj = client_json(text)
    except json.JSONDecodeError as exc:
        return LineProblem(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
    except ValueError as exc:
        return LineProblem(number, f"not JSON this server reads: {exc}")
    if not isinstance(obj, dict):
        return LineProblem(number, f"expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineProblem(number, "custom_id is missing or not a non-empty string")
    method = obj.get("method")
    if method != "POST":
        return LineProblem(number, f"method must be 'POST', got {method!r}")
    url = obj.get("url")
    if url not in BATCH_URLS:
        return LineProblem(number, f"url {url!r} is not one of {', '.join(BATCH_URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineProblem(number, "body is missing or not a JSON object")
    if model is None and (not isinstance(body.get("model"), str) or not body["model"]):
        return LineProblem(number, "body.model is missing (name the model in each body, or pass --model)")
    if body.get("stream"):
        return LineProblem(number, "body.stream is true; batch requests cannot stream (drop it)")
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return LineProblem(number, "body.messages is missing or empty (a chat completion needs messages)")
    elif url == "/v1/embeddings":
        if "input" not in body:
            return LineProblem(number, "body.input is missing (an embedding needs its input)")
    elif "prompt" not in body:
        return LineProblem(number, "body.prompt is missing (a completion needs a prompt)")
    if model is not None:
        body = {**body, "model": model}
    return BatchRequest(line=number, custom_id=custom_id, method=method, url=url, body=body)


def validate(lines: Iterable[bytes | str], *, model: str | None = None) -> tuple[int, list[LineProblem]]:
    """``(requests, problems)`` for a whole file in one pass: memory stays flat but for the set of ids.

    ``requests`` counts the lines that are not blank; duplicate ``custom_id``s name the first line.
    """
    first_line: dict[str, int] = {}
    problems: list[LineProblem] = []
    count = 0
    for number, raw in enumerate(lines, start=1):
        checked = check_line(number, raw, model=model)
        if checked is None:
            continue
        count += 1
        if isinstance(checked, LineProblem):
            problems.append(checked)
            continue
        first = first_line.setdefault(checked.custom_id, number)
        if first != number:
            problems.append(LineProblem(number, f"duplicate custom_id {checked.custom_id!r} (first on line {first})"))
    return count, problems


def read_requests(
    lines: Iterable[bytes | str], *, model: str | None = None, name: str = "the batch file"
) -> Iterator[BatchRequest]:
    """Every request of a valid file, streamed in file order; :class:`BatchFileInvalid` before the first.

    The file is read twice (checked whole, then streamed), so ``lines`` must be re-iterable: a list,
    or a seekable file object (rewound between the passes). Use :func:`read_requests_file` for a path.
    """
    if isinstance(lines, io.IOBase):
        if not lines.seekable():
            raise TypeError("read_requests needs a seekable file (it reads the file twice)")
        start = lines.tell()
    elif iter(lines) is lines:
        raise TypeError("read_requests needs a re-iterable (a list or a seekable file), not a one-shot iterator")
    total, problems = validate(lines, model=model)
    if problems:
        raise BatchFileInvalid(problems, lines_total=total, name=name)
    if isinstance(lines, io.IOBase):
        lines.seek(start)
    return _stream(lines, model)


def _stream(lines: Iterable[bytes | str], model: str | None) -> Iterator[BatchRequest]:
    for number, raw in enumerate(lines, start=1):
        checked = check_line(number, raw, model=model)
        if isinstance(checked, BatchRequest):
            yield checked
        elif isinstance(checked, LineProblem):  # the file changed between the two passes
            raise BatchFileInvalid([checked], lines_total=number)


def read_requests_file(path: Path, *, model: str | None = None, checked: bool = False) -> Iterator[BatchRequest]:
    """:func:`read_requests` over a file on disk, checked whole first (unless the caller just did: ``checked``;
    each line is still checked as it streams); the file is closed when the stream ends."""
    handle = path.open("rb")
    try:
        requests = _stream(handle, model) if checked else read_requests(handle, model=model, name=str(path))
    except BaseException:
        handle.close()
        raise

    def stream() -> Iterator[BatchRequest]:
        with handle:
            yield from requests

    return stream()


def new_batch_request_id() -> str:
    """An id for one output line, shaped like OpenAI's (``batch_req_`` and 32 hex digits)."""
    return f"batch_req_{secrets.token_hex(16)}"


def output_line(
    request: BatchRequest, *, status_code: int, body: dict[str, Any], request_id: str, batch_request_id: str
) -> dict[str, Any]:
    """One line of the output file: the answer the request got, as OpenAI writes it."""
    return {
        "id": batch_request_id,
        "custom_id": request.custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(
    request: BatchRequest,
    *,
    code: str,
    message: str,
    batch_request_id: str,
    status_code: int | None = None,
    body: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """One line of the errors file, as OpenAI writes it.

    With an HTTP answer (``status_code`` and ``body``, a 400 from the model say) the answer is kept in
    ``response`` and ``error`` is null, as OpenAI's error file carries them; with no answer at all
    (the connection failed on every retry) ``response`` is null and ``error`` says why.
    """
    if status_code is not None:
        return {
            "id": batch_request_id,
            "custom_id": request.custom_id,
            "response": {
                "status_code": status_code,
                "request_id": request_id or "",
                "body": body if body is not None else {"error": {"message": message, "code": code}},
            },
            "error": None,
        }
    return {
        "id": batch_request_id,
        "custom_id": request.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def is_transient(status_code: int | None) -> bool:
    """Whether a failure may pass if retried later: no answer (``None``), 408, 429, or a 5xx but 501."""
    if status_code is None:
        return True
    return status_code in (408, 429) or (status_code >= 500 and status_code != 501)


def dumps_line(record: dict[str, Any]) -> bytes:
    """One record as one JSONL line (compact, UTF-8, ending in a newline)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


__all__ = [
    "BATCH_URLS",
    "BatchFileInvalid",
    "BatchRequest",
    "LineProblem",
    "check_line",
    "dumps_line",
    "error_line",
    "is_transient",
    "new_batch_request_id",
    "output_line",
    "read_requests",
    "read_requests_file",
    "validate",
]
