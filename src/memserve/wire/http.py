"""What the gateway's and the runner's HTTP apps share: request validation, the ``param`` path format,
errors as responses, content-type and origin checks at the door, SSE encoding, and cancelling work whose
client went away.

Torch-free, so the gateway can import it. One format for ``param`` everywhere: ``messages[0].content``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive

from memserve.errors import InvalidArgument, MemserveError, OriginNotAllowed, UnsupportedMediaType, error_body

__all__ = ["SSE_DONE", "check_json_content_type", "check_origin", "error_response", "install_error_handlers",
           "invalid_argument", "param_path", "parse_body", "sse_event", "until_disconnected"]

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


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
        return "the request body must be a JSON object, sent with Content-Type: application/json"
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


def check_json_content_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    got = f"Content-Type {media!r}" if media else "no Content-Type"
    raise UnsupportedMediaType(f"this route takes a JSON body, but the request has {got}; send the body "
                               "with Content-Type: application/json")


def check_origin(origin: str | None, host: str | None, scheme: str, allowed: Iterable[str]) -> None:
    """403 for a browser request from a page on another origin, unless that origin is configured.

    Browsers send ``Origin`` with every cross-origin request; a request without one is not from a web
    page (curl, the openai client), and a page served by this gateway itself is same-origin.
    """
    if origin is None:
        return
    if host is not None and origin.lower() == f"{scheme}://{host}".lower():
        return
    allowed = list(allowed)
    if "*" in allowed or origin in allowed:
        return
    raise OriginNotAllowed(f"requests from web pages on {origin} are not allowed here; add that origin to "
                           "cors_origins (memserve.yaml or MEMSERVE_CORS_ORIGINS) to allow them")


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` until it ends or the client goes away (then cancel it and return None).

    Neither uvicorn nor Starlette cancels a handler whose client left; without this, a long prefill
    or a non-streamed answer would run to the end for nobody. The request body must have been read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.wait((task, watcher))  # let the work close what it holds
    return None if task.cancelled() else task.result()


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body has already been read)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a transport that fails to receive has lost its client too
        log.debug("receive failed; treating it as a disconnect", exc_info=True)


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def error_response(exc: Exception) -> JSONResponse:
    """A memserve error in the OpenAI shape (with Retry-After where retrying helps), anything else a 500."""
    if isinstance(exc, MemserveError):
        retry = getattr(exc, "retry_after_seconds", None)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
        return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)
    return _plain_error(500, f"internal error: {type(exc).__name__}: {exc}")


def _plain_error(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message), status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI, *, serves: str) -> None:
    """Every error of ``app`` leaves in the OpenAI shape with all four keys, validation errors as 400s
    with ``param`` as ``messages[0].content``; ``serves`` ends the message of an unknown route."""

    @app.exception_handler(MemserveError)
    async def memserve_error(request: Request, exc: MemserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_argument(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        allowed = (exc.headers or {}).get("Allow")
        if exc.status_code == 404:
            message = f"no route {where}; {serves}"
        elif exc.status_code == 405 and allowed:
            message = f"{where} is not allowed; use {allowed} {request.url.path}"
        else:
            message = f"{where}: {exc.detail}"
        return _plain_error(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer is sent, so the server logs the traceback once
        return error_response(exc)
