"""The gateway's HTTP face: OpenAI routes that route by model name, and the management API.

It never imports torch: local models are runner processes owned by the ModelPool, remote models are
providers; both are OpenAI-compatible upstreams reached through ``upstream.forward``.

Routing of the ``model`` field (``route``):

- ``provider/model`` where ``provider`` is configured → that provider, with ``model`` sent upstream;
- a configured local model → a lease from the pool (loading it first if needed), then its runner;
- anything else → 404 ``model_not_found`` with the closest names.

A local model that cannot be served now (does not fit: 507, memory busy: 503, queue full: 429) goes to
its configured ``fallback`` instead, and the response says so in ``x-memserve-fallback`` (the provider
model) and ``x-memserve-fallback-reason`` (the error code that caused it).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from memserve import __version__
from memserve.config import ProviderConfig, Settings
from memserve.errors import (
    InsufficientMemory,
    InvalidArgument,
    MemoryBusy,
    MemserveError,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
    error_body,
)
from memserve.gateway.upstream import Upstream, forward
from memserve.memory.fit import fit_json, fit_result
from memserve.pool.pool import ModelPool
from memserve.pool.runner_process import RUNNER_BASE_URL
from memserve.units import parse_seconds

log = logging.getLogger(__name__)

FALLBACK_HEADER = "x-memserve-fallback"
FALLBACK_REASON_HEADER = "x-memserve-fallback-reason"
ROUTES = ("POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /api/ps, "
          "POST /api/load, POST /api/unload, GET /api/fit, GET /api/memory, GET /api/events")
_FALLBACK_ON = (InsufficientMemory, MemoryBusy, Overloaded)


@dataclass(frozen=True)
class Route:
    """Where one request goes: a local model by name, or a provider and the model id it knows."""

    kind: Literal["local", "provider"]
    name: str  # local model name, or provider name
    upstream_model: str | None = None


def route(model: str, settings: Settings) -> Route:
    """Resolve the ``model`` field; ModelNotFound (404) with close names when nothing matches."""
    provider_name, slash, upstream_model = model.partition("/")
    if slash and settings.provider(provider_name) is not None and upstream_model:
        return Route("provider", provider_name, upstream_model)
    if settings.model(model) is not None:
        return Route("local", model)
    known = [m.name for m in settings.models] + [f"{p.name}/{m}" for p in settings.providers for m in p.models]
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(known) or 'none configured'}"
    raise ModelNotFound(f"model {model!r} is not served here; {hint} (GET /v1/models lists them)", param="model")


class _LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    keep_alive: str | float | None = None
    context: int | None = None
    concurrency: int | None = None


class _UnloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


_Body = TypeVar("_Body", bound=BaseModel)


class Providers:
    """One pooled HTTP client per configured provider, opened with the app and closed with it."""

    def __init__(self, providers: list[ProviderConfig]) -> None:
        self.configs = {p.name: p for p in providers}
        self.clients = {p.name: httpx.AsyncClient(timeout=httpx.Timeout(p.timeout_seconds, connect=10.0))
                        for p in providers}

    def upstream(self, name: str) -> Upstream:
        config = self.configs[name]
        return Upstream(f"provider {name}", config.base_url, self.clients[name], config.api_key())

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))


def create_app(settings: Settings, pool: ModelPool) -> ASGIApp:
    """The gateway app; its lifespan starts the pool (preloads) and stops every runner at shutdown."""
    providers = Providers(settings.providers)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.shutdown()
            await providers.aclose()

    app = FastAPI(title="memserve", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)

    async def completion(request: Request, path: str) -> Response:
        raw = await _read_body(request, settings.max_body_bytes)
        body = _json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgument("missing required parameter 'model' (a string naming a model; GET /v1/models "
                                  "lists them)", param="model")
        keep_alive = body.pop("keep_alive", None)  # ours (as Ollama's): never sent upstream
        stream = body.get("stream") is True
        target = route(model, settings)
        if target.kind == "provider":
            return await forward(providers.upstream(target.name), path, {**body, "model": target.upstream_model},
                                 stream=stream)
        keep_alive_seconds = None if keep_alive is None else parse_seconds(keep_alive, what="keep_alive")
        try:
            lease = await pool.acquire(model, keep_alive_seconds=keep_alive_seconds)
        except _FALLBACK_ON as exc:
            fallback = settings.model(model).fallback  # type: ignore[union-attr]  # route() found it
            if fallback is None:
                raise
            provider_name, _, upstream_model = fallback.partition("/")
            headers = {FALLBACK_HEADER: fallback, FALLBACK_REASON_HEADER: str(exc.code)}
            return await forward(providers.upstream(provider_name), path, {**body, "model": upstream_model},
                                 stream=stream, headers=headers)
        upstream = Upstream(f"runner {model}", RUNNER_BASE_URL, lease.client, transport=lease.transport)
        unchanged = keep_alive is None  # then the client's own bytes go to the runner, not a re-encoding
        return await forward(upstream, path, raw if unchanged else body, stream=stream, on_done=lease.release)

    async def chat_completions(request: Request) -> Response:
        return await completion(request, "/chat/completions")

    async def completions(request: Request) -> Response:
        return await completion(request, "/completions")

    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    hot_routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "/v1/chat/completions": chat_completions, "/v1/completions": completions}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        states = {e.name: e.state for e in pool.entries.values()}
        data = [{"id": m.name, "object": "model", "created": int(started), "owned_by": "memserve",
                 "memserve": {"state": states.get(m.name), "source": m.source}} for m in settings.models]
        data += [{"id": f"{p.name}/{m}", "object": "model", "created": int(started), "owned_by": p.name}
                 for p in settings.providers for m in p.models]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "uptime_seconds": round(time.time() - started, 3),
                "models": {e.name: e.state for e in pool.entries.values()}}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        return pool.ps()

    @app.post("/api/load")
    async def load(request: Request) -> dict[str, Any]:
        body = _validated(_LoadBody, await _json_body(request, settings.max_body_bytes))
        keep_alive = None if body.keep_alive is None else parse_seconds(body.keep_alive, what="keep_alive")
        row = await pool.load(body.model, keep_alive_seconds=keep_alive, context_tokens=body.context,
                              concurrency=body.concurrency)
        return {"model": row}

    @app.post("/api/unload")
    async def unload(request: Request) -> dict[str, Any]:
        body = _validated(_UnloadBody, await _json_body(request, settings.max_body_bytes))
        return {"model": body.model, "unloaded": await pool.unload(body.model)}

    @app.get("/api/fit")
    async def fit(model: str, context: int | None = None, concurrency: int | None = None) -> dict[str, Any]:
        configured = settings.model(model)
        source = configured.source if configured else model
        inventory = pool.fit_inventory()
        facts, request_, result = await asyncio.to_thread(
            fit_result, source, context=context or (configured.context_tokens if configured else None),
            concurrency=concurrency or (configured.concurrency if configured else 1), inventory=inventory)
        return {**fit_json(facts, request_, result, inventory), "free_now": pool.ledger.free_bytes()}

    @app.get("/api/memory")
    async def memory() -> dict[str, Any]:
        host = psutil.virtual_memory()
        return {**pool.ledger.to_json(), "host": {"total_bytes": host.total, "available_bytes": host.available},
                "watchdog": {"tolerance": settings.watchdog_tolerance,
                             "tolerance_min_bytes": settings.watchdog_tolerance_min_bytes,
                             "host_floor_bytes": settings.host_floor_bytes}}

    @app.get("/api/events")
    async def events(since: int = 0) -> dict[str, Any]:
        return {"events": pool.events_since(since)}

    return _HotRoutes(app, hot_routes)


class _HotRoutes:
    """ASGI: a POST to a generation route goes straight to its handler, everything else to FastAPI.

    The generation routes relay every token of the answer. Through FastAPI each request and each relayed
    chunk passes its whole middleware stack (error, telemetry, body-limit, exception and exit-stack
    layers, with a wrapped ``send`` per layer); a py-spy of the gateway put a third of its relay time
    there. Errors here get the same responses as FastAPI's handlers give (``_error_for``).
    """

    def __init__(self, app: FastAPI, routes: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except Exception as exc:
            if not isinstance(exc, MemserveError):
                log.exception("internal error in POST %s", scope["path"])  # a bug: keep its traceback
            response = _error_for(exc)
        await response(scope, receive, send)


async def _json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object, read no further than ``max_bytes``."""
    return _json_object(await _read_body(request, max_bytes))


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body's bytes, read no further than ``max_bytes``."""
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


def _json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as one JSON object, or InvalidArgument saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON ({exc}); send one JSON object with "
                              "Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object, not "
                              f"{type(body).__name__}; send one JSON object")
    return body


def _validated(model: type[_Body], data: dict[str, Any]) -> _Body:
    """A management body checked by its pydantic model; a bad field is a 400 naming it."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidArgument(f"invalid value for '{where}': {first['msg']}", param=where) from None


def _too_large(size: int, max_bytes: int) -> str:
    return (f"the request body is at least {size} bytes; this server accepts at most {max_bytes} "
            "(max_body_bytes); send a smaller request")


def _error_response(status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param=param, code=code), status_code=status_code,
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI shape, with all four keys; Retry-After where retrying helps."""

    @app.exception_handler(MemserveError)
    async def memserve_error(request: Request, exc: MemserveError) -> JSONResponse:
        return _error_for(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(400, f"invalid value for '{where}': {first.get('msg', 'invalid')}", param=where,
                               code="invalid_argument")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        allowed = (exc.headers or {}).get("Allow")
        if exc.status_code == 404:
            message = f"no route {where}; memserve serves {ROUTES}"
        elif exc.status_code == 405 and allowed:
            message = f"{where} is not allowed; use {allowed} {request.url.path}"
        else:
            message = f"{where}: {exc.detail}"
        return _error_response(exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_for(exc)


def _error_for(exc: Exception) -> JSONResponse:
    """A memserve error in the OpenAI shape (with Retry-After where retrying helps), anything else a 500."""
    if isinstance(exc, MemserveError):
        retry = getattr(exc, "retry_after_seconds", None)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
        return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)
    return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")
