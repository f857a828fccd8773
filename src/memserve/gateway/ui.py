"""``/ui``, the live memory page: static files from the package, fed by the management API and one SSE route.

The page holds no data, so its files are public even with keys on (``auth.PUBLIC_PATHS``); everything it
shows comes from ``/api/*`` (and ``/metrics`` when it is served) with the admin key a person types into it.
The pool's events reach it over ``GET /api/events/stream``: server-sent events, first the backlog after
``since`` (or the ``Last-Event-ID`` a reconnecting client sends), then each event as the pool adds it.

A stream keeps no queue of its own: the pool's event log is the buffer. Its listener
(``EventLog.subscribe``) only wakes the stream, which then sends what it has not sent yet from the log,
so a slow client holds nothing but its place in the log, and one that fell further behind than the log
keeps is told so (``gap``). A client that goes away ends its stream (Starlette cancels the response) and
unsubscribes it. ``close`` ends every stream when the server stops: uvicorn waits for open responses
before it shuts down, and an open tab would hold that drain for its whole timeout.

The page, the stream's wire format and what each part shows are in ``docs/ui.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query, Request
from starlette.responses import Response
from starlette.types import ASGIApp

from memserve.errors import InvalidArgument
from memserve.pool.events import EventLog
from memserve.wire.http import EventStream, handles
from memserve.wire.routes import EVENTS_STREAM, UI, UI_SCRIPT, UI_STYLE, Route

__all__ = ["HEARTBEAT_SECONDS", "LiveStreams", "close_live_streams", "install_ui"]

HEARTBEAT_SECONDS = 15.0
"""A comment line this often on an idle stream, so proxies and browsers keep it open (nginx: 60 s)."""

_FILES: dict[Route, tuple[str, str]] = {
    UI: ("index.html", "text/html; charset=utf-8"),
    UI_SCRIPT: ("app.js", "text/javascript; charset=utf-8"),
    UI_STYLE: ("style.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the page handles an admin key: only its own files run, and nothing else may frame it
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
}


class LiveStreams:
    """The open ``/api/events/stream`` responses over one event log."""

    def __init__(self, log: EventLog, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self._log = log
        self._heartbeat_seconds = heartbeat_seconds
        self._wakes: set[asyncio.Event] = set()
        self._closing = False

    @property
    def open(self) -> int:
        """Streams being served now."""
        return len(self._wakes)

    def close(self) -> None:
        """End every stream at its next step, and refuse none: a stream opened later ends at once."""
        self._closing = True
        for wake in self._wakes:
            wake.set()

    async def frames(self, since: int) -> AsyncGenerator[bytes, None]:
        """The events after ``since`` as SSE frames, then every new one, until the client or the server goes."""
        wake = asyncio.Event()
        unsubscribe = self._log.subscribe(lambda _event: wake.set())
        self._wakes.add(wake)
        try:
            newest = max((event.seq for event in self._log), default=0)
            if since > newest:  # a client from before this server started: its numbers mean nothing here
                yield _frame("reset", {"since": since, "newest": newest})
                since = 0
            sent = since
            while not self._closing:
                wake.clear()  # before reading: an event added while a frame is sent wakes the next read
                backlog = self._log.since(sent)
                if backlog and sent and backlog[0]["seq"] > sent + 1:
                    yield _frame("gap", {"after": sent, "next": backlog[0]["seq"]})
                for event in backlog:
                    yield _frame("pool", event, event_id=event["seq"])
                    sent = event["seq"]
                if self._closing:
                    break
                try:
                    async with asyncio.timeout(self._heartbeat_seconds):
                        await wake.wait()
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self._wakes.discard(wake)
            unsubscribe()


def install_ui(app: FastAPI, log: EventLog, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> LiveStreams:
    """Serve the page's files and ``GET /api/events/stream`` from ``app``; the streams are returned (and kept
    on ``app.state.live_streams``) so that the server can end them before it drains (``close_live_streams``).

    None of these routes is in the OpenAPI document: the files are not an API, and a client generated from
    the document (or a fuzzer) would wait on the stream forever.
    """
    streams = LiveStreams(log, heartbeat_seconds=heartbeat_seconds)
    app.state.live_streams = streams

    for route, (name, media_type) in _FILES.items():
        handles(app, route, include_in_schema=False)(_file_handler(name, media_type))

    @handles(app, EVENTS_STREAM, include_in_schema=False)
    async def events_stream(request: Request, since: int | None = Query(default=None, ge=0)) -> Response:
        start = _start(since, request.headers.get("last-event-id"))
        # X-Accel-Buffering: nginx passes each frame on at once instead of filling its buffer first
        return EventStream(streams.frames(start), headers={"X-Accel-Buffering": "no"})

    return streams


def close_live_streams(app: ASGIApp) -> None:
    """End the live streams of ``app`` (as ``create_app`` returns it, or its FastAPI app), if it serves any."""
    inner = getattr(app, "app", app)  # the gateway's hot-route wrapper keeps FastAPI's app as .app
    state = getattr(inner, "state", None)
    streams = getattr(state, "live_streams", None)
    if isinstance(streams, LiveStreams):
        streams.close()


def _file_handler(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve_file() -> Response:
        body = resources.files(__package__).joinpath("ui", name).read_bytes()
        return Response(body, media_type=media_type, headers=_HEADERS)

    serve_file.__name__ = f"ui_{name.replace('.', '_')}"
    return serve_file


def _start(since: int | None, last_event_id: str | None) -> int:
    """Where a stream starts: after the ``Last-Event-ID`` a reconnecting client sends, else ``since``, else 0."""
    if last_event_id is None or not last_event_id.strip():
        return since or 0
    with contextlib.suppress(ValueError):
        if (seq := int(last_event_id)) >= 0:
            return seq
    raise InvalidArgument(
        f"Last-Event-ID must be the id of a pool event (a whole number, 0 or more), got {last_event_id!r}; "
        "send the id of the last event received, or leave the header out to start from 'since'",
        param="Last-Event-ID",
    )


def _frame(event: str, data: Mapping[str, Any], *, event_id: int | None = None) -> bytes:
    """One SSE frame: ``id`` (pool events only), ``event`` and the JSON ``data`` on one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()
