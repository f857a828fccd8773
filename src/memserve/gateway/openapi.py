"""The gateway's OpenAPI document: every status each route can answer, the generation routes' request bodies
and their server-sent events, and 400 (never 422) for bad input. Read by ``memserve.gateway.app``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from memserve.wire.routes import CHAT_COMPLETIONS, COMPLETIONS
from memserve.wire.schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    TextCompletionChunk,
)

COMMON_ERRORS = {
    400: "a bad query parameter",
    401: "auth is on (auth: keys) and the request has no valid API key",
    403: "a browser page from an origin not in cors_origins, or a key that may not use this model or route",
    503: "auth is on and the server's key store is not open yet (it is starting)",
}
JSON_BODY_ERRORS = {
    **COMMON_ERRORS,
    404: "no such model is configured",
    413: "the body is larger than max_body_bytes",
    415: "the body is not declared application/json",
}
GENERATION_ERRORS = {
    **JSON_BODY_ERRORS,
    400: "the body is not a valid request (types are strict), asks for something unsupported, or the prompt and "
    "max_tokens do not fit the model's context",
    429: "the model's queue is full, or the key went past one of its limits (Retry-After)",
    502: "the model's runner failed (crashed, killed by the watchdog, or could not start), or a provider failed",
    503: "memory is held by busy models past memory_wait_seconds (Retry-After), or the server is shutting down",
    504: "the request ran past request_timeout (a stream ends with an error event instead)",
    507: "the model cannot fit on this server even with nothing else loaded (the planner's NoFit)",
}
LOAD_ERRORS = {**GENERATION_ERRORS, 400: "a bad field, or options the model cannot be planned with"}
ADAPTER_ERRORS = {
    **LOAD_ERRORS,
    400: "a bad field, or a folder that is not a LoRA adapter for this model (another base, no weights)",
    404: "no such model, or no such adapter",
    409: "the name is taken, or the model is loading (add the adapter when it is ready)",
}
FIT_ERRORS = {
    **COMMON_ERRORS,
    404: "not a configured model, and not a hub id the server may look up",
    503: "the hub did not answer in time",
}


def responses(
    ok: type[BaseModel] | None, errors: Mapping[int, str], chunk: type[BaseModel] | None = None
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses``: every status the route can answer, each error in the OpenAI shape; with
    ``chunk``, the 200 may also be server-sent events, each a chunk, an error, or ``[DONE]``."""
    out: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in sorted(errors.items())
    }
    if ok is not None:
        out[200] = {
            "model": ok,
            "description": "The answer; with stream: true, server-sent events ending with data: [DONE]",
        }
    if chunk is not None:
        # [DONE] is not JSON: it is its own branch beside the JSON payloads, a chunk or an error (schemathesis
        # parses every event under contentMediaType application/json: a stream fuzzed to its end failed ST108)
        json_data = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [schema_ref(chunk), schema_ref(ErrorResponse)]},
        }
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
        }
        out[200]["content"] = {"text/event-stream": {"schema": event}}
    return out


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (so that a bad one is our 400)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def document(app: FastAPI, served: list[str]) -> dict[str, Any]:
    """FastAPI's document, plus the generation routes' request bodies, with 400 (not 422) for bad input.

    ``model`` lists the names this server serves (any other name is a documented 404), so a client
    generated from the document, or a fuzzer, can reach the models.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        routes=app.routes,
        description="memserve: OpenAI-compatible routes (/v1) and management (/api).",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for chunk in (ChatCompletionChunk, TextCompletionChunk):  # named only inside the SSE schemas
        schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[chunk.__name__] = schema
    for path, model in ((CHAT_COMPLETIONS.path, ChatCompletionRequest), (COMPLETIONS.path, CompletionRequest)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        if served:
            schema["properties"]["model"]["enum"] = served
        schemas[model.__name__] = schema
        document["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    for operations in document["paths"].values():
        for operation in operations.values():
            invalid = operation.get("responses", {}).pop("422", None)
            if invalid is not None:
                operation["responses"].setdefault(
                    "400",
                    {
                        "description": "a bad parameter",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    },
                )
            operation["responses"].setdefault(
                "403",
                {
                    "description": COMMON_ERRORS[403],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                },
            )
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    app.openapi_schema = document
    return document
