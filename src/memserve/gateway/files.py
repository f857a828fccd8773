"""OpenAI's Files API on the gateway (``/v1/files``): the batch jobs' input files, and their output and errors.

The official openai client works unchanged: ``files.create(file=..., purpose="batch")``, ``retrieve``, ``list``,
``content``, ``delete``. An uploaded file is checked whole with the batch format (``memserve.batch.format``)
before it is accepted: every bad line by number, in one 400. Files live in the store (``store/batches.py``) in
parts of ``PART_BYTES``, streamed in and out. A key sees its own files; an admin (and everyone with auth off)
sees all. What the batches' routes (``gateway/batches.py``) share with these is here too: who may see what, and
the list page.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from memserve.batch.format import BatchFileInvalid, validate
from memserve.errors import InvalidArgument, MemserveError, RequestTooLarge, StoreUnavailable, UnsupportedMediaType
from memserve.gateway import openapi
from memserve.gateway.auth import ANONYMOUS, Caller
from memserve.store.batches import PART_BYTES, BatchStore, StoredFile
from memserve.wire.http import handles
from memserve.wire.routes import FILE, FILE_CONTENT, FILE_DELETE, FILE_UPLOAD, FILES

if TYPE_CHECKING:
    from memserve.gateway.app import Service

MAX_UPLOAD_BYTES = 200 * (1 << 20)
"""The largest batch input file accepted (OpenAI's limit for batch files)."""
MAX_LIST = 10_000
_FILENAME = re.compile(r"[^\w.@+-]")


class FileNotFound(MemserveError):
    """No file with that id, or not one this key may see (the same answer: ids are not confirmed)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "file_not_found"


class BatchConflict(MemserveError):
    """The batch or file is in a state that does not allow this (cancel a finished batch, delete a file in use)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


def batch_store(service: Service) -> BatchStore:
    """The store's files and jobs; StoreUnavailable (503) before the store is open or after it closed."""
    if service.store is None:
        raise StoreUnavailable("the batch store is not open (the server is starting or stopping); retry shortly")
    return service.store.batches


def visible(caller: Caller, key_id: str | None) -> bool:
    """A key sees its own files and jobs; an admin (and everyone with auth off) sees all."""
    return caller.admin or (caller.key is not None and caller.key.id == key_id)


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", None) or ANONYMOUS


def page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """One page of a list, in OpenAI's shape."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


async def visible_file(service: Service, request: Request, file_id: str) -> StoredFile:
    """The file ``file_id`` if the caller may see it; FileNotFound otherwise (the same answer as no such file)."""
    found = await batch_store(service).get_file(file_id)
    if found is None or not visible(caller_of(request), found.key_id):
        raise FileNotFound(f"no file {file_id!r} here (GET /v1/files lists yours)", param="file_id")
    return found


def add_file_routes(app: FastAPI, service: Service) -> None:
    """Register ``/v1/files``; the store comes from ``service`` (None before it opens)."""
    upload_errors = openapi.responses(
        None,
        {
            **openapi.COMMON_ERRORS,
            400: "a bad line (each by number), no request, a malformed upload, or a purpose other than batch",
            413: f"a file over {MAX_UPLOAD_BYTES} bytes",
            415: "the body is not declared multipart/form-data",
        },
    )
    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "OpenAI batch JSONL"},
                            "purpose": {"type": "string", "enum": ["batch"]},
                        },
                    }
                }
            },
        }
    }
    listed = openapi.responses(None, openapi.COMMON_ERRORS)
    missing_file = openapi.responses(None, {**openapi.COMMON_ERRORS, 404: "no such file, or not one this key may see"})
    in_use = {409: "the file is the input of a running batch (cancel it first)"}

    @handles(app, FILE_UPLOAD, responses=upload_errors, openapi_extra=upload_body)
    async def upload(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES + 64 * 1024:
            raise RequestTooLarge(
                f"the upload is {int(declared)} bytes; a batch file may have at most {MAX_UPLOAD_BYTES} bytes: "
                "split it into several batches"
            )
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise UnsupportedMediaType(
                f"an upload is multipart/form-data, not {kind or 'a body without a Content-Type'}: send the file as "
                "the part 'file' and purpose=batch (curl -F purpose=batch -F file=@batch.jsonl; the openai "
                "client's files.create does)"
            )
        try:
            form = await request.form(max_files=1, max_fields=8)
        except MemserveError:
            raise
        except Exception as exc:  # starlette's parser: a malformed multipart body
            raise InvalidArgument(
                f"could not read the upload as multipart/form-data ({exc}); send the file as the part 'file' and "
                "purpose=batch (the openai client's files.create does)",
                param="file",
            ) from exc
        try:
            purpose = form.get("purpose")
            upload = form.get("file")
            if purpose != "batch":
                raise InvalidArgument(
                    f"purpose {purpose!r} is not served here; memserve keeps files for batches: purpose=batch",
                    param="purpose",
                )
            if not isinstance(upload, UploadFile):
                raise InvalidArgument("missing the file: send it as the multipart part 'file'", param="file")
            size = upload.size if upload.size is not None else 0
            if size > MAX_UPLOAD_BYTES:
                raise RequestTooLarge(
                    f"the file is {size} bytes; a batch file may have at most {MAX_UPLOAD_BYTES} bytes: split it"
                )
            name = _FILENAME.sub("_", upload.filename or "input.jsonl")[:200] or "input.jsonl"
            handle = upload.file
            handle.seek(0)
            count, problems = await asyncio.to_thread(validate, handle)
            if problems:
                raise BatchFileInvalid(problems, lines_total=count, name=name)
            if count == 0:
                raise InvalidArgument(f"{name} holds no request: one JSON object a line", param="file")
            handle.seek(0)
            parts = iter(lambda: handle.read(PART_BYTES), b"")
            caller = caller_of(request)
            file_id = f"file-{os.urandom(12).hex()}"
            stored = await batch_store(service).create_file(
                file_id, purpose="batch", filename=name, key_id=caller.key.id if caller.key else None, parts=parts
            )
        finally:
            await form.close()
        return stored.to_openai()

    @handles(app, FILES, responses=listed)
    async def list_files(
        request: Request,
        purpose: str | None = None,
        limit: int = Query(default=MAX_LIST, ge=1, le=MAX_LIST),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        caller = caller_of(request)
        found, more = await batch_store(service).list_files(
            key_id=caller.key.id if caller.key else None,
            everyone=caller.admin,
            purpose=purpose,
            limit=limit,
            after=after,
            newest_first=order == "desc",
        )
        return page([f.to_openai() for f in found], more)

    @handles(app, FILE, responses=missing_file)
    async def get_file(request: Request, file_id: str) -> dict[str, Any]:
        return (await visible_file(service, request, file_id)).to_openai()

    @handles(
        app,
        FILE_CONTENT,
        response_class=Response,
        responses={
            **missing_file,
            200: {"description": "the file's bytes", "content": {"application/jsonl": {"schema": {"type": "string"}}}},
        },
    )
    async def file_content(request: Request, file_id: str) -> Response:
        found = await visible_file(service, request, file_id)
        return StreamingResponse(
            batch_store(service).content(found.id),
            media_type="application/jsonl",
            headers={"Content-Length": str(found.bytes)},
        )

    @handles(app, FILE_DELETE, responses={**missing_file, **openapi.responses(None, in_use)})
    async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        found = await visible_file(service, request, file_id)
        readers = await batch_store(service).batches_reading(found.id)
        if readers:
            raise BatchConflict(
                f"file {file_id} is the input of batch {', '.join(readers)}, still running; cancel it first "
                "(POST /v1/batches/{id}/cancel) or wait for it to finish",
                param="file_id",
            )
        await batch_store(service).delete_file(found.id)
        return {"id": found.id, "object": "file", "deleted": True}


__all__ = [
    "MAX_LIST",
    "MAX_UPLOAD_BYTES",
    "BatchConflict",
    "FileNotFound",
    "add_file_routes",
    "batch_store",
    "caller_of",
    "page",
    "visible",
    "visible_file",
]
