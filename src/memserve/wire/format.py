"""The OpenAI wire format without a web framework: error bodies, ``Retry-After``, the ``param`` path of a
validation error, and server-sent events.

``memserve.wire.http`` builds the apps' responses from these; the fake OpenAI server (``wire.fake``, which
``memserve bench`` ships) and the CLI use them directly, so importing them never costs FastAPI's import.
One format for ``param`` everywhere: ``messages[0].content``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from memserve.errors import InvalidArgument, MemserveError, error_body

__all__ = [
    "NOT_A_JSON_OBJECT",
    "SSE_DONE",
    "SSE_MEDIA_TYPE",
    "error_json",
    "invalid_argument",
    "param_path",
    "parse_body",
    "retry_after",
    "sse_event",
]

M = TypeVar("M", bound=BaseModel)

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


NOT_A_JSON_OBJECT = "the request body must be a JSON object, sent with Content-Type: application/json"


def sse_event(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def error_json(exc: Exception) -> dict[str, Any]:
    """The OpenAI error body of ``exc``: a MemserveError's own, anything else a 500 ``internal error``."""
    if isinstance(exc, MemserveError):
        return exc.to_openai()
    return error_body(500, f"internal error: {type(exc).__name__}: {exc}")


def retry_after(seconds: float) -> str:
    """``Retry-After`` for a wait of ``seconds``: whole seconds, rounded up, at least 1 (0 would invite a
    retry storm)."""
    return str(max(1, math.ceil(seconds)))


def param_path(loc: Iterable[int | str]) -> str | None:
    """``("body", "messages", 0, "content")`` → ``messages[0].content``."""
    parts = list(loc)
    name = ""
    for part in parts[1:] if parts[:1] == ["body"] else parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def _message(error: Mapping[str, Any], param: str | None) -> str:
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "malformed")
        return f"the request body is not valid JSON ({reason}); send one JSON object"
    if param is None or kind == "model_attributes_type":
        return NOT_A_JSON_OBJECT
    if kind == "missing":
        return f"missing required parameter '{param}'"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"invalid value for '{param}': {message}"


def invalid_argument(errors: list[Any]) -> InvalidArgument:
    """A 400 for pydantic's (or FastAPI's) validation errors: the first one in words, and how many more."""
    first = errors[0] if errors else {}
    param = None if first.get("type") == "json_invalid" else param_path(first.get("loc", ()))
    message = _message(first, param)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InvalidArgument(message, param=param)


def parse_body(model: type[M], data: Any) -> M:
    """``data`` validated by ``model``; InvalidArgument (400) naming the first bad field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_argument(list(exc.errors())) from None
