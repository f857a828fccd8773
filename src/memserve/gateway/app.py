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
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memserve import __version__
from memserve.checkpoint.locate import hub_offline
from memserve.config import ProviderConfig, Settings
from memserve.engines.fit import fit_json, fit_result
from memserve.errors import (
    HubUnavailable,
    InsufficientMemory,
    InvalidArgument,
    MemoryBusy,
    MemserveError,
    ModelNotFound,
    Overloaded,
    RequestTimedOut,
    StoreUnavailable,
    shown,
)
from memserve.gateway import openapi
from memserve.gateway.accounts import add_account_routes
from memserve.gateway.auth import ANONYMOUS, PUBLIC_PATHS, Auth, Caller, auth_mode, end_user
from memserve.gateway.batch_jobs import BATCH_CLIENT, BatchJobs, make_generate
from memserve.gateway.batches import add_batch_routes
from memserve.gateway.door import Door
from memserve.gateway.limits import Limiter
from memserve.gateway.metering import CLIENT_CLOSED_REQUEST, RequestRecord, answer_metered, metered
from memserve.gateway.metrics import CONTENT_TYPE_LATEST, RequestMetrics, render, take_snapshot
from memserve.gateway.ui import install_ui
from memserve.gateway.upstream import Upstream, forward
from memserve.memory.probe import host_memory
from memserve.pool.pool import ModelPool
from memserve.pool.runner_process import RUNNER_BASE_URL
from memserve.store.db import Store, database_url
from memserve.store.usage import UsageLog
from memserve.units import parse_seconds
from memserve.wire.http import (
    SSE_DONE,
    check_json_content_type,
    check_origin,
    error_response,
    handles,
    install_error_handlers,
    json_body,
    json_object,
    parse_body,
    read_body,
    sse_event,
    until_disconnected,
)
from memserve.wire.routes import (
    ADAPTER_ADD,
    ADAPTER_REMOVE,
    ADAPTERS,
    CHAT_COMPLETIONS,
    CLASSIFY,
    COMPLETIONS,
    EMBEDDINGS,
    EVENTS,
    FIT,
    GATEWAY_ROUTES,
    HEALTH,
    LOAD,
    MEMORY,
    METRICS,
    MODEL,
    MODELS,
    PS,
    UNLOAD,
    describe,
)
from memserve.wire.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ModelCard,
    ModelList,
    TextCompletion,
    TextCompletionChunk,
)

log = logging.getLogger(__name__)

FALLBACK_HEADER = "x-memserve-fallback"
FALLBACK_REASON_HEADER = "x-memserve-fallback-reason"
FALLBACK_MODEL_HEADER = "x-memserve-fallback-for"
_FALLBACK_ON = (InsufficientMemory, MemoryBusy, Overloaded)
_NAME_CHARS = 256  # of a model name kept in a usage row and a log line (as of an end user's), or matched by difflib
HUB_FIT_SECONDS = 15.0
"""How long ``GET /api/fit`` waits for the hub about a model that is not configured."""


@dataclass(frozen=True)
class Route:
    """Where one request goes: a local model by name, or a provider and the model id it knows."""

    kind: Literal["local", "provider"]
    name: str  # local model name, or provider name
    upstream_model: str | None = None


def route(model: str, settings: Settings, adapter: Callable[[str], tuple[str, str] | None] = lambda _: None) -> Route:
    """Resolve the ``model`` field; ModelNotFound (404) with close names when nothing matches.

    ``adapter`` finds a LoRA adapter (``adapter`` or ``base:adapter``): its route is its base's runner, with the
    adapter's own name as the model the runner knows.
    """
    provider_name, slash, upstream_model = model.partition("/")
    if slash and settings.provider(provider_name) is not None and upstream_model:
        return Route("provider", provider_name, upstream_model)
    if settings.model(model) is not None:
        return Route("local", model)
    on_base = adapter(model)
    if on_base is not None:
        return Route("local", on_base[0], on_base[1])
    known = [m.name for m in settings.models] + [f"{p.name}/{m}" for p in settings.providers for m in p.models]
    # difflib is quadratic: a name far longer than any served one is close to none of them anyway
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.4) if len(model) <= _NAME_CHARS else []
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(known) or 'none configured'}"
    raise ModelNotFound(f"model {shown(model)} is not served here; {hint} (GET /v1/models lists them)", param="model")


class LoadBody(BaseModel):
    """``POST /api/load``: load a model now (Ollama's preload), optionally for a larger context or
    concurrency than configured. The options apply to this load only."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)
    keep_alive: str | float | None = Field(default=None, description='e.g. "10m", 600, -1 (forever)')
    context: int | None = Field(default=None, ge=1, description="Context length in tokens for this load.")
    concurrency: int | None = Field(default=None, ge=1, description="Sequences generated for at once.")


class AdapterBody(BaseModel):
    """``POST /api/adapters``: put a LoRA adapter on a model, loaded or not, without reloading it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, description="The base model (a configured local model).")
    name: str = Field(min_length=1, pattern=r"^[^/:\s]+$", description="What clients will call it (no '/' or ':').")
    source: str = Field(min_length=1, description="The PEFT adapter folder on the server's disk.")


class UnloadBody(BaseModel):
    """``POST /api/unload``: stop a model's runner (it drains its requests first)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)


class Providers:
    """One pooled HTTP client per configured provider, opened with the app and closed with it."""

    def __init__(self, providers: list[ProviderConfig]) -> None:
        self.configs = {p.name: p for p in providers}
        self.clients = {
            p.name: httpx.AsyncClient(timeout=httpx.Timeout(p.timeout_seconds, connect=10.0)) for p in providers
        }

    def upstream(self, name: str) -> Upstream:
        config = self.configs[name]
        return Upstream(f"provider {name}", config.base_url, self.clients[name], config.api_key())

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))


@dataclass
class Service:
    """What the gateway opens in its lifespan: the store's keys (``auth``), usage log and limits.

    Before the store is open (or in an app run without its lifespan) nothing is metered, and with keys on
    every request but ``/health`` is refused with a 503, never let through.
    """

    keys_on: bool
    store: Store | None = None
    auth: Auth | None = None
    usage: UsageLog | None = None
    limiter: Limiter | None = None
    metrics: RequestMetrics | None = None  # /metrics' request tallies, on the loop

    async def caller(self, path: str, headers: Headers) -> Caller | None:
        if self.auth is not None:
            return await self.auth.caller(path, headers)
        if self.keys_on and path != "/health":
            raise StoreUnavailable("the server is starting (its key store is not open yet); retry in a few seconds")
        return ANONYMOUS


def create_app(settings: Settings, pool: ModelPool, *, store: Store | None = None) -> ASGIApp:
    """The gateway app; its lifespan opens the store (unless given one), starts the pool (preloads), and at
    shutdown stops every runner and writes the last usage rows."""
    providers = Providers(settings.providers)
    started = time.time()
    service = Service(
        keys_on=auth_mode(settings.auth, settings.host, insecure=True) == "keys", metrics=RequestMetrics(settings)
    )
    public_paths = PUBLIC_PATHS | {METRICS.path} if settings.metrics_public else PUBLIC_PATHS

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = store or await Store.open(database_url(settings.database_url, settings.data_dir))
        opened.usage.start(flush_seconds=settings.usage_flush_seconds)
        service.store = opened
        service.auth = Auth(opened.keys if service.keys_on else None, public_paths=public_paths)
        service.usage, service.limiter = opened.usage, Limiter(opened.usage)
        for stored in await opened.adapters.list():  # added at run time before a restart: served again
            why = pool.restore_adapter(stored.model, stored.name, stored.source)
            if why is not None:
                log.warning(
                    "adapter %s on %s (%s) is not served again: %s", stored.name, stored.model, stored.source, why
                )
        await pool.start()
        await jobs.start(opened.batches)
        try:
            yield
        finally:
            try:
                await jobs.stop()
                await pool.shutdown()
                await providers.aclose()
            finally:
                service.store = service.auth = service.usage = service.limiter = None
                if store is None:
                    await opened.close()  # writes the usage rows still buffered
                else:
                    await opened.usage.flush()

    app = FastAPI(title="memserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app, serves=f"memserve serves {describe(GATEWAY_ROUTES)}")

    door = Door(settings, pool)

    async def completion(request: Request, path: str) -> Response:
        check_json_content_type(request.headers.get("content-type"))
        raw = await read_body(request, settings.max_body_bytes)
        body = json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            what = "missing required parameter 'model'" if model is None else f"'model' is {json.dumps(model)[:40]}"
            raise InvalidArgument(f"{what}; send a string naming a model (GET /v1/models lists them)", param="model")
        record: RequestRecord | None = getattr(request.state, "record", None)
        if record is None:  # only the hot routes check keys and meter: never serve around them
            raise InvalidArgument(f"POST /v1{path} is served by memserve's own entry point, not by FastAPI's")
        on_base = pool.adapter(model)  # a LoRA adapter is metered and allowed under its own name
        record.model = on_base[1] if on_base is not None else model[:_NAME_CHARS]  # a usage row and a log line
        record.user = end_user(body.get("user"), request.headers)
        caller = record.caller or ANONYMOUS
        caller.check_model(record.model)
        keep_alive = body.pop("keep_alive", None)  # ours (as Ollama's): never sent upstream
        keep_alive_seconds = None if keep_alive is None else parse_seconds(keep_alive, what="keep_alive")
        target = route(model, settings, lambda _: on_base)  # the adapter lookup above, not a second one

        async def to_provider(name: str, upstream_model: str | None, headers: dict[str, str] | None = None) -> Response:
            """Relay to provider ``name``: its route, or a local model's fallback (``headers`` then say so)."""
            record.provider = name
            if service.metrics is not None:
                service.metrics.begin(record)  # in flight at the provider (again, under it, for a fallback)
            ask = providers.configs[name].stream_usage
            sent, record.meter = metered(body, stream, record.admission, ask=ask, record=record)
            upstream_body = {**sent, "model": upstream_model}
            return await forward(
                providers.upstream(name), path, upstream_body, stream=stream, headers=headers, meter=record.meter
            )

        if target.kind == "provider":  # the provider judges its own fields (tools, images, ...)
            stream = _stream_flag(body)
            await record.admit(service.limiter, body)
            return await to_provider(target.name, target.upstream_model)
        if service.metrics is not None:
            service.metrics.begin(record)
        base = target.name  # the runner: the model itself, or an adapter's base
        messages = body.get("messages")
        stream = bool(await door.check(base, path, body))  # everything a runner would refuse, before any load
        await record.admit(service.limiter, body)
        sent, record.meter = metered(body, stream, record.admission, record=record)
        receive = request.receive
        if request.scope.get("client") != BATCH_CLIENT:
            jobs.interactive(base)  # batches on this model keep to one slot for a while
        asked = time.monotonic()
        try:
            lease = await until_disconnected(receive, pool.acquire(base, keep_alive_seconds=keep_alive_seconds))
            record.queue_seconds = time.monotonic() - asked
        except _FALLBACK_ON as exc:
            fallback = settings.model(base).fallback  # type: ignore[union-attr]  # route() found it
            if fallback is None or on_base is not None:  # a provider has no such adapter
                raise
            provider_name, _, upstream_model = fallback.partition("/")
            headers = {FALLBACK_HEADER: fallback, FALLBACK_REASON_HEADER: str(exc.code), FALLBACK_MODEL_HEADER: model}
            record.fallback, record.fallback_code = True, str(exc.code)
            try:
                return await to_provider(provider_name, upstream_model, headers)
            except MemserveError as failed:
                failed.message = (
                    f"model {model!r} could not be served here ({exc.message}), and its fallback "
                    f"{fallback} failed too: {failed.message}"
                )
                raise
        if lease is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        upstream = Upstream(f"runner {base}", RUNNER_BASE_URL, lease.client, transport=lease.transport)
        lora = pool.lora_scales(base, on_base[1] if on_base is not None else None)
        rename = None
        if lora is not None:  # llama-server: the adapter by its id, in the body (it knows no adapter names)
            sent = {**sent, "model": base, "lora": lora}
            rename = (base, model) if model != base else None  # it answers its alias, the base's name
        # then the client's own bytes go to the runner (a door that inlined fetched images put new messages in body)
        unchanged = keep_alive is None and sent is body and body.get("messages") is messages
        answer = forward(
            upstream,
            path,
            raw if unchanged else sent,
            stream=stream,
            on_done=lease.release,
            meter=record.meter,
            model=rename,
        )
        timeout = settings.request_timeout_seconds
        if stream:
            return _Deadline(await answer, timeout, model)
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                whole = await until_disconnected(receive, answer)
        except TimeoutError:
            raise RequestTimedOut(_timed_out(model, timeout)) from None
        return Response(status_code=CLIENT_CLOSED_REQUEST) if whole is None else whole

    # Documented through FastAPI (and served by it where _HotRoutes is not in front); the body is parsed by
    # the handler itself, so the OpenAPI document gets its request schema from openapi.document.
    @handles(
        app,
        CHAT_COMPLETIONS,
        response_model=None,
        summary="Chat completion (OpenAI-compatible), streamed as SSE with stream: true",
        responses=openapi.responses(ChatCompletion, openapi.GENERATION_ERRORS, ChatCompletionChunk),
    )
    async def chat_completions(request: Request) -> Response:
        return await completion(request, "/chat/completions")

    @handles(
        app,
        COMPLETIONS,
        response_model=None,
        summary="Text completion (OpenAI-compatible), streamed as SSE with stream: true",
        responses=openapi.responses(TextCompletion, openapi.GENERATION_ERRORS, TextCompletionChunk),
    )
    async def completions(request: Request) -> Response:
        return await completion(request, "/completions")

    @handles(
        app,
        EMBEDDINGS,
        response_model=None,
        summary="Embeddings (OpenAI-compatible) from an embedding model (docs/encoders.md)",
        responses=openapi.responses(None, openapi.GENERATION_ERRORS),
    )
    async def embeddings(request: Request) -> Response:
        return await completion(request, "/embeddings")

    @handles(
        app,
        CLASSIFY,
        response_model=None,
        summary="Classification (vLLM's /v1/classify) by a sequence-classification model (docs/encoders.md)",
        responses=openapi.responses(None, openapi.GENERATION_ERRORS),
    )
    async def classify(request: Request) -> Response:
        return await completion(request, "/classify")

    served = [m.name for m in settings.models] + [f"{p.name}/{m}" for p in settings.providers for m in p.models]
    app.openapi = lambda: openapi.document(app, served)  # type: ignore[method-assign]
    hot_routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
        CHAT_COMPLETIONS.path: chat_completions,
        COMPLETIONS.path: completions,
        EMBEDDINGS.path: embeddings,
        CLASSIFY.path: classify,
    }
    jobs = BatchJobs(settings, pool, make_generate(hot_routes, service))

    @handles(app, MODELS, response_model=ModelList, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def models(request: Request) -> dict[str, Any]:
        caller: Caller = getattr(request.state, "caller", None) or ANONYMOUS
        return {"object": "list", "data": [m for m in model_list() if caller.allows(m["id"])]}

    @handles(
        app,
        MODEL,
        response_model=ModelCard,
        responses=openapi.responses(None, {**openapi.COMMON_ERRORS, 404: "no such model, or one the key may not use"}),
    )
    async def model(request: Request, model: str) -> dict[str, Any]:
        """One model as ``/v1/models`` lists it (OpenAI's retrieve); a 404 for one the caller may not use, as
        the list hides it."""
        caller: Caller = getattr(request.state, "caller", None) or ANONYMOUS
        found = next((m for m in model_list() if m["id"] == model and caller.allows(model)), None)
        if found is None:
            raise ModelNotFound(f"model {shown(model)} is not served here; GET /v1/models lists the models")
        return found

    def model_list() -> list[dict[str, Any]]:
        """Every model this gateway serves: its own, their adapters and the providers'."""
        states = {e.name: e.state for e in pool.entries.values()}
        data: list[dict[str, Any]] = [
            {
                "id": m.name,
                "object": "model",
                "created": int(started),
                "owned_by": "memserve",
                "memserve": {"state": states.get(m.name), "source": m.source},
            }
            for m in settings.models
        ]
        data += [  # each adapter is a model of its own, its base its parent (as vLLM lists LoRA modules)
            {
                "id": adapter,
                "object": "model",
                "created": int(started),
                "owned_by": "memserve",
                "root": source,
                "parent": entry.name,
                "memserve": {"state": entry.state, "source": source},
            }
            for entry in pool.entries.values()
            for adapter, source in entry.adapters.items()
        ]
        data += [
            {"id": f"{p.name}/{m}", "object": "model", "created": int(started), "owned_by": p.name}
            for p in settings.providers
            for m in p.models
        ]
        return data

    @handles(app, HEALTH, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - started, 3),
            "models": {e.name: e.state for e in pool.entries.values()},
            "usage": service.usage.health() if service.usage is not None else None,
        }

    @handles(app, PS, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def ps() -> dict[str, Any]:
        return pool.ps()

    @handles(
        app, LOAD, responses=openapi.responses(None, openapi.LOAD_ERRORS), openapi_extra=openapi.body_doc(LoadBody)
    )
    async def load(request: Request) -> dict[str, Any]:
        body = parse_body(LoadBody, await json_body(request, settings.max_body_bytes))
        keep_alive = None if body.keep_alive is None else parse_seconds(body.keep_alive, what="keep_alive")
        row = await pool.load(
            body.model, keep_alive_seconds=keep_alive, context_tokens=body.context, concurrency=body.concurrency
        )
        return {"model": row}

    @handles(
        app,
        UNLOAD,
        responses=openapi.responses(None, openapi.JSON_BODY_ERRORS),
        openapi_extra=openapi.body_doc(UnloadBody),
    )
    async def unload(request: Request) -> dict[str, Any]:
        body = parse_body(UnloadBody, await json_body(request, settings.max_body_bytes))
        return {"model": body.model, "unloaded": await pool.unload(body.model)}

    @handles(app, ADAPTERS, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def adapters() -> dict[str, Any]:
        return {
            "data": [
                {"name": adapter, "model": entry.name, "source": source, "state": entry.state}
                for entry in pool.entries.values()
                for adapter, source in entry.adapters.items()
            ]
        }

    @handles(
        app,
        ADAPTER_ADD,
        responses=openapi.responses(None, openapi.ADAPTER_ERRORS),
        openapi_extra=openapi.body_doc(AdapterBody),
    )
    async def add_adapter(request: Request) -> dict[str, Any]:
        body = parse_body(AdapterBody, await json_body(request, settings.max_body_bytes))
        row = await pool.add_adapter(body.model, body.name, body.source)
        if service.store is not None:  # so that a restarted gateway serves it again
            await service.store.adapters.put(body.name, body.model, str(Path(body.source).expanduser().resolve()))
        return {"adapter": body.name, "model": row}

    @handles(app, ADAPTER_REMOVE, responses=openapi.responses(None, openapi.ADAPTER_ERRORS))
    async def remove_adapter(name: str) -> dict[str, Any]:
        on_base = pool.adapter(name)
        if on_base is None:
            raise ModelNotFound(f"no adapter {name!r} is served here (GET /api/adapters lists them)", param="name")
        row = await pool.remove_adapter(*on_base)
        if service.store is not None:  # a restart does not bring it back (one in the config file comes back)
            await service.store.adapters.remove(on_base[1])
        return {"adapter": on_base[1], "model": row, "removed": True}

    @handles(app, FIT, responses=openapi.responses(None, openapi.FIT_ERRORS))
    async def fit(
        model: str = Query(min_length=1),
        context: int | None = Query(default=None, ge=1),
        concurrency: int | None = Query(default=None, ge=1),
    ) -> dict[str, Any]:
        """The plan for a configured model, or for a hub id when the hub may be reached: never for a path."""
        configured = settings.model(model)
        source = configured.source if configured else _fit_hub_id(model, settings)
        inventory = pool.fit_inventory()
        work = asyncio.to_thread(
            fit_result,
            source,
            context=context or (configured.context_tokens if configured else None),
            concurrency=concurrency or (configured.concurrency if configured else 1),
            inventory=inventory,
        )
        try:
            facts, request_, result = await asyncio.wait_for(work, None if configured else HUB_FIT_SECONDS)
        except TimeoutError:
            raise HubUnavailable(
                f"the hub did not answer about {model!r} within {HUB_FIT_SECONDS:g} s; retry "
                "later, or configure the model and fit it by name"
            ) from None
        return {**fit_json(facts, request_, result, inventory), "free_now": pool.ledger.free_bytes()}

    @handles(app, MEMORY, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def memory() -> dict[str, Any]:
        return {
            **pool.ledger.to_json(),
            "host": host_memory().to_json(),
            "watchdog": {
                "tolerance": settings.watchdog_tolerance,
                "tolerance_min_bytes": settings.watchdog_tolerance_min_bytes,
                "host_floor_bytes": settings.host_floor_bytes,
            },
        }

    @handles(app, EVENTS, responses=openapi.responses(None, openapi.COMMON_ERRORS))
    async def events(since: int = 0) -> dict[str, Any]:
        return {"events": pool.events_since(since)}

    @handles(
        app,
        METRICS,
        response_class=Response,
        summary="Prometheus metrics (docs/metrics.md): requests, memory per device and model, lifecycle",
        responses={
            **openapi.responses(None, openapi.COMMON_ERRORS),
            200: {
                "description": "Prometheus's text format",
                "content": {CONTENT_TYPE_LATEST.partition(";")[0]: {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics() -> Response:
        snapshot = take_snapshot(pool, service.metrics)  # on the loop, no await: one consistent instant
        return Response(await asyncio.to_thread(render, snapshot), media_type=CONTENT_TYPE_LATEST)

    install_ui(app, pool.history)
    add_batch_routes(app, service, jobs, settings.max_body_bytes)
    app.state.batch_jobs = jobs  # its slots, for tests
    add_account_routes(
        app,
        lambda: service.store.keys if service.store else None,
        lambda: service.usage,
        settings.max_body_bytes,
    )
    return _HotRoutes(app, hot_routes, settings.cors_origins, service)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _fit_hub_id(model: str, settings: Settings) -> str:
    """``model`` when ``GET /api/fit`` may look it up on the hub; ModelNotFound otherwise.

    The route answers about models this server may serve: configured names, and hub ids when the hub is
    allowed. Anything path-like, and any name that happens to exist on the server's disk, gets the same
    answer as a name that exists nowhere, so the route tells a caller nothing about the file system.
    """
    configured = ", ".join(m.name for m in settings.models) or "none"
    refusal = (
        f"model {model!r} is not configured on this server (configured: {configured}); GET /api/fit "
        "answers for configured models{hub}"
    )
    if hub_offline():
        raise ModelNotFound(refusal.format(hub=" (hub lookups are off: HF_HUB_OFFLINE is set)"), param="model")
    if not _HUB_ID.match(model) or ".." in model or Path(model).expanduser().exists():
        raise ModelNotFound(refusal.format(hub=" and hub ids (org/name)"), param="model")
    return model


def _stream_flag(body: dict[str, Any]) -> bool:
    """``stream`` must be a JSON boolean: ``"true"`` or ``1`` would leave the relay guessing."""
    value = body.get("stream")
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidArgument(
        f"invalid value for 'stream': expected true or false, got {json.dumps(value)}", param="stream"
    )


def _timed_out(model: str, seconds: float) -> str:
    return (
        f"the request to model {model!r} ran past request_timeout ({seconds:g} s) and its generation was "
        "stopped; ask for fewer tokens (max_tokens), or raise request_timeout"
    )


class _Deadline(Response):
    """A streamed answer that ends with an SSE error event and ``[DONE]`` once it runs past the deadline.

    Leaving the relay cancels it, which closes the runner's response: the runner sees its client go and
    frees the sequence.
    """

    def __init__(self, answer: Response, seconds: float, model: str) -> None:
        super().__init__()
        self.answer, self.seconds, self.model = answer, seconds, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = finished = False

        async def watched(message: Message) -> None:
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = finished or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        with anyio.move_on_after(self.seconds) as deadline:
            await self.answer(scope, receive, watched)
        if not deadline.cancelled_caught or finished:
            return
        error = RequestTimedOut(_timed_out(self.model, self.seconds))
        if not started:
            await error_response(error)(scope, receive, send)
            return
        await send({"type": "http.response.body", "body": sse_event(error.to_openai()) + SSE_DONE, "more_body": False})


class _HotRoutes:
    """ASGI: a POST to a generation route goes straight to its handler, everything else to FastAPI.

    The generation routes relay every token of the answer. Through FastAPI each request and each relayed
    chunk passes its whole middleware stack (error, telemetry, body-limit, exception and exit-stack
    layers, with a wrapped ``send`` per layer); a py-spy of the gateway put a third of its relay time
    there. Errors here get the same responses as FastAPI's handlers give (``_error_for``).

    Every request is checked for its browser origin first (``check_origin``), then for its key (``Auth``:
    every route, FastAPI's included, so a new route cannot slip through unprotected), and every generation
    request leaves one log line and one usage row: model, status, tokens, time to the first byte of the
    answer, duration.
    """

    def __init__(
        self,
        app: FastAPI,
        routes: dict[str, Callable[[Request], Awaitable[Response]]],
        cors_origins: list[str],
        service: Service,
    ) -> None:
        self.app = app
        self.routes = routes
        self.cors_origins = cors_origins
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        try:
            check_origin(headers.get("origin"), headers.get("host"), scope.get("scheme", "http"), self.cors_origins)
            state["caller"] = await self.service.caller(scope["path"], headers)
        except MemserveError as exc:
            if scope["type"] == "websocket":  # none is served today; a future one is checked all the same
                await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
                return
            await error_response(exc)(scope, receive, send)
            return
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        await answer_metered(handler, scope, receive, send, self.service, what=f"POST {scope['path']}")
