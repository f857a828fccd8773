"""What the gateway's and the runner's HTTP apps share: request validation, errors as responses, content-type
and origin checks at the door, JSON bodies read no further than a limit, the streamed response that cleans up
however it ends, and cancelling work whose client went away.

Torch-free, so the gateway can import it. The parts that need no web framework (the ``param`` path format,
error bodies, ``Retry-After``, SSE encoding) live in ``memserve.wire.format`` and are re-exported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from memserve.errors import (
    InvalidArgument,
    MemserveError,
    OriginNotAllowed,
    RequestTooLarge,
    UnsupportedMediaType,
    error_body,
)
from memserve.wire.format import (
    SSE_DONE,
    SSE_MEDIA_TYPE,
    error_json,
    invalid_argument,
    param_path,
    parse_body,
    retry_after,
    sse_event,
)
from memserve.wire.routes import Route

__all__ = [
    "SSE_DONE",
    "SSE_MEDIA_TYPE",
    "EventStream",
    "check_json_content_type",
    "check_origin",
    "error_body_response",
    "error_json",
    "error_response",
    "handles",
    "install_error_handlers",
    "invalid_argument",
    "json_body",
    "json_object",
    "param_path",
    "parse_body",
    "read_body",
    "retry_after",
    "sse_event",
    "until_disconnected",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def handles(app: FastAPI, route: Route, **options: Any) -> Callable[[F], F]:
    """Register the decorated function as ``app``'s handler of ``route`` (from ``wire.routes``): FastAPI's
    ``@app.get(path)`` with the method and path from the one table the tests check the apps against."""

    def register(endpoint: F) -> F:
        app.add_api_route(route.path, endpoint, methods=[route.method], **options)
        return endpoint

    return register


def check_json_content_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/*+json``)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    got = f"Content-Type {media!r}" if media else "no Content-Type"
    raise UnsupportedMediaType(
        f"this route takes a JSON body, but the request has {got}; send the body with Content-Type: application/json"
    )


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
    raise OriginNotAllowed(
        f"requests from web pages on {origin} are not allowed here; add that origin to "
        "cors_origins (memserve.yaml or MEMSERVE_CORS_ORIGINS) to allow them"
    )


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` until it ends or the client goes away (then cancel it and return None).

    Neither uvicorn nor Starlette cancels a handler whose client left; without this, a long prefill
    or a non-streamed answer would run to the end for nobody. The request body must have been read.

    ``work`` runs in the calling task, and one watcher task cancels that task when the client leaves (the
    way ``asyncio.timeout`` cancels it): no task for the work, and none of ``asyncio.wait``'s futures, on a
    path every request takes (58 µs a call with them, most requests' work being a lease that is ready).
    A cancellation from elsewhere (a timeout, a shutdown) is never taken for the client leaving.
    """
    task = asyncio.current_task()
    assert task is not None, "until_disconnected runs in a task"
    pending = {"cancel": False, "over": False}  # our cancel not yet taken back; the work has ended

    def client_left(watcher: asyncio.Future[None]) -> None:
        if not pending["over"] and not watcher.cancelled():  # a callback queued as the work ended: moot
            pending["cancel"] = True
            task.cancel()

    watcher = asyncio.ensure_future(_disconnected(receive))
    watcher.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if pending["cancel"]:
            pending["cancel"] = False
            if task.uncancel() == 0:  # our cancel, and only ours: the client left
                return None
        raise
    finally:
        pending["over"] = True
        watcher.cancel()
        if pending["cancel"]:  # the work swallowed our cancel: take it back, so no later await sees it
            task.uncancel()


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body has already been read)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a transport that fails to receive has lost its client too
        log.debug("receive failed; treating it as a disconnect", exc_info=True)


def error_response(exc: Exception) -> JSONResponse:
    """``exc`` as an answer in the OpenAI shape (with Retry-After where retrying helps); not a MemserveError: a 500."""
    if not isinstance(exc, MemserveError):
        return error_body_response(500, error_json(exc))
    retry = getattr(exc, "retry_after_seconds", None)
    headers = {"Retry-After": retry_after(retry)} if retry is not None else None
    return error_body_response(exc.status_code, error_json(exc), headers)


def error_body_response(
    status_code: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An OpenAI error body (``error_body``, ``error_json``) as the answer, with its status and headers."""
    return JSONResponse(dict(body), status_code=status_code, headers=dict(headers) if headers else None)


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
        return error_body_response(exc.status_code, error_body(exc.status_code, message), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer is sent, so the server logs the traceback once
        return error_response(exc)


class EventStream(StreamingResponse):
    """A server-sent event stream that closes its body, then runs ``on_close``, however the response ends.

    Starlette (1.x, ASGI < 2.4) cancels the body's iteration when the client disconnects and leaves the
    generator to the garbage collector; a server on ASGI 2.4 fails ``send`` instead, leaving the body
    suspended at a ``yield``. Closing the body here, shielded from that cancellation, releases what it holds
    at once (a runner's engine sequence, a relay's upstream answer), even when the body never started;
    ``on_close`` then frees what the body does not own, and runs even if closing the body failed.
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        on_close: Callable[[], Awaitable[None]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # X-Accel-Buffering: an nginx in front that buffers or gzips proxied answers still passes each event on
        super().__init__(
            body,
            media_type=SSE_MEDIA_TYPE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self._body = body
        self._on_close = on_close

    def after_close(self, then: Callable[[], Awaitable[None]]) -> None:
        """Run ``then`` after ``on_close`` (and however that ended), when the response ends."""
        first = self._on_close

        async def both() -> None:
            try:
                if first is not None:
                    await first()
            finally:
                await then()

        self._on_close = both

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._body.aclose()
            finally:
                if self._on_close is not None:
                    with anyio.CancelScope(shield=True):
                        await self._on_close()


async def json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object (declared JSON: 415 otherwise), read no further than ``max_bytes``."""
    check_json_content_type(request.headers.get("content-type"))
    return json_object(await read_body(request, max_bytes))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body's bytes, read no further than ``max_bytes`` (413 past them, ``max_body_bytes`` named)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge(_too_large(int(declared), max_bytes))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge(_too_large(size, max_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.pattern.encode())


def client_json(raw: bytes | str) -> Any:
    """``json.loads`` for what a client sent (bytes, or text read from them): ValueError for all it cannot read,
    with a message that says why.

    Beyond malformed JSON and bytes that are not UTF-8 (``JSONDecodeError``, ``UnicodeDecodeError``), that is
    nesting deeper than Python's recursion limit (``json`` raises RecursionError past ~1,000 levels), an integer
    of more than 4,300 digits (ValueError), and a string holding a lone UTF-16 surrogate (an escape such as
    ``\\ud800`` without its pair). JSON's grammar allows that escape, but it is not Unicode text: nothing after
    could write it as UTF-8 (the runner's tokenizer, a usage row, a log line). Escaped pairs (an emoji as
    ``\\ud83d\\ude00``) are one character and read as ever; only bodies holding such an escape are walked.
    """
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("it nests arrays or objects deeper than this server reads (about 1,000 levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # Python's bound on int(str), which json.loads applies to numbers
        raise ValueError("it holds an integer of more than 4,300 digits, longer than this server reads") from None
    if isinstance(raw, bytes):  # a backslash first: memchr, 4x faster than the pattern over a 20 MB image body
        escape = b"\\" in raw and _SURROGATE_ESCAPE_BYTES.search(raw) is not None
    else:
        escape = "\\" in raw and _SURROGATE_ESCAPE.search(raw) is not None
    where = _not_text_at(value) if escape else None
    if where is not None:
        raise ValueError(
            f"the string at {where} holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair), "
            "which is not Unicode text; send the character itself, or both halves of its pair"
        )
    return value


def _not_text_at(value: Any) -> str | None:
    """Where the first string (or key) in ``value`` that is not Unicode text is, as ``messages[0].content``
    (``body`` for the whole); None when all are. A walk with a stack, as deep as JSON reads."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and not _is_text(item):
            return path or "body"
        if isinstance(item, dict):
            for key, child in item.items():
                if not _is_text(key):
                    return f"{path or 'body'} (a key)"
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as one JSON object, or InvalidArgument saying what is wrong with it."""
    try:
        body = client_json(raw)
    except ValueError as exc:
        what = "is not valid JSON" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else "cannot be read"
        raise InvalidArgument(
            f"the request body {what} ({exc}); send one JSON object with Content-Type: application/json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidArgument(
            f"the request body must be a JSON object, not {type(body).__name__}; send one JSON object"
        )
    return body


def _too_large(size: int, max_bytes: int) -> str:
    return (
        f"the request body is at least {size} bytes; this server accepts at most {max_bytes} "
        "(max_body_bytes); send a smaller request"
    )
