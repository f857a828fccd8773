"""OpenAI's Batch API on the gateway (``/v1/batches``): create, retrieve, list, cancel.

The official openai client works unchanged (``batches.create``, ``retrieve``, ``list``, ``cancel``). These routes
only read and change a job's row in the store; the job itself runs in ``gateway/batch_jobs.py``, and its input,
output and errors files are the Files API's (``gateway/files.py``), registered with these.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from memserve.errors import InvalidArgument, MemserveError
from memserve.gateway import openapi
from memserve.gateway.batch_jobs import BatchJobs
from memserve.gateway.files import (
    BatchConflict,
    FileNotFound,
    add_file_routes,
    batch_store,
    caller_of,
    page,
    visible,
    visible_file,
)
from memserve.store.batches import StoredBatch
from memserve.wire.http import handles, json_body, parse_body
from memserve.wire.routes import BATCH, BATCH_CANCEL, BATCH_CREATE, BATCHES

if TYPE_CHECKING:
    from memserve.gateway.app import Service

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
_METADATA_MAX = 16


class BatchNotFound(MemserveError):
    """No batch with that id, or not one this key may see."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "batch_not_found"


class BatchCreate(BaseModel):
    """``POST /v1/batches``: run every request of an uploaded file (purpose ``batch``) against ``endpoint``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = Field(default=None, description="Accepted; outputs are kept.")


def add_batch_routes(app: FastAPI, service: Service, jobs: BatchJobs, max_body_bytes: int) -> None:
    """Register ``/v1/files`` (``gateway/files.py``) and ``/v1/batches``; the store comes from ``service`` (None
    before it opens), and ``jobs`` runs what is created."""
    add_file_routes(app, service)

    async def visible_batch(request: Request, batch_id: str) -> StoredBatch:
        found = await batch_store(service).get_batch(batch_id)
        if found is None or not visible(caller_of(request), found.key_id):
            raise BatchNotFound(f"no batch {batch_id!r} here (GET /v1/batches lists yours)", param="batch_id")
        return found

    listed = openapi.responses(None, openapi.COMMON_ERRORS)
    missing_batch = openapi.responses(
        None, {**openapi.COMMON_ERRORS, 404: "no such batch, or not one this key may see"}
    )
    finished = {409: "the batch has finished: there is nothing to cancel"}

    batch_errors = openapi.responses(None, {**openapi.JSON_BODY_ERRORS, 404: "no such input file, or not this key's"})

    @handles(app, BATCH_CREATE, responses=batch_errors, openapi_extra=openapi.body_doc(BatchCreate))
    async def create_batch(request: Request) -> dict[str, Any]:
        body = parse_body(BatchCreate, await json_body(request, max_body_bytes))
        if body.metadata is not None and (
            len(body.metadata) > _METADATA_MAX or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())
        ):
            raise InvalidArgument(
                f"metadata may have at most {_METADATA_MAX} keys of up to 64 characters, values up to 512",
                param="metadata",
            )
        try:
            source = await visible_file(service, request, body.input_file_id)
        except FileNotFound as exc:
            exc.param = "input_file_id"
            raise
        if source.purpose != "batch":
            raise InvalidArgument(
                f"file {source.id} has purpose {source.purpose!r}; a batch's input is a file uploaded with purpose "
                "batch",
                param="input_file_id",
            )
        caller = caller_of(request)
        created = await batch_store(service).create_batch(
            f"batch_{os.urandom(12).hex()}",
            endpoint=body.endpoint,
            input_file_id=source.id,
            completion_window=COMPLETION_WINDOWS[body.completion_window],
            window_text=body.completion_window,
            key_id=caller.key.id if caller.key else None,
            key_name=caller.name,
            metadata=body.metadata,
        )
        jobs.submit(created.id)
        return created.to_openai()

    @handles(app, BATCHES, responses=listed)
    async def list_batches(
        request: Request, limit: int = Query(default=20, ge=1, le=100), after: str | None = None
    ) -> dict[str, Any]:
        caller = caller_of(request)
        found, more = await batch_store(service).list_batches(
            key_id=caller.key.id if caller.key else None, everyone=caller.admin, limit=limit, after=after
        )
        return page([b.to_openai() for b in found], more)

    @handles(app, BATCH, responses=missing_batch)
    async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return (await visible_batch(request, batch_id)).to_openai()

    @handles(app, BATCH_CANCEL, responses={**missing_batch, **openapi.responses(None, finished)})
    async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
        found = await visible_batch(request, batch_id)
        changed = await batch_store(service).update_batch(
            found.id, when=("validating", "in_progress"), status="cancelling", cancelling_at=datetime.now(UTC)
        )
        if not changed:
            current = await visible_batch(request, batch_id)
            if current.status in ("cancelling", "cancelled"):
                return current.to_openai()
            raise BatchConflict(
                f"batch {batch_id} is {current.status}; only a validating or in-progress batch can be cancelled",
                param="batch_id",
            )
        jobs.cancel(found.id)
        jobs.submit(found.id)  # finishes the cancel here when no gateway runs it now
        return (await visible_batch(request, batch_id)).to_openai()


__all__ = ["BatchCreate", "BatchNotFound", "add_batch_routes"]
