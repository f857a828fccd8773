"""A scripted OpenAI-compatible server for tests: remote providers and runners are faked with it.

``FakeUpstream`` is a FastAPI app with ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models``. It echoes the model it was asked for, counts words as tokens for ``usage``, and
records every request (path, JSON body, Authorization header) and every byte it answered. Set
``mode`` (and the fields next to it) to script what it does:

- ``NORMAL``: a chat or text completion, whole or streamed (``stream_options.include_usage`` honoured);
- ``GARBAGE``: 200 text/plain that is not JSON;
- ``ERROR``: ``error_status`` with ``error_body`` (an OpenAI error by default; a dict is sent as JSON,
  a str as text/html) and ``error_headers`` (e.g. Retry-After);
- ``DIE_MID_STREAM``: a streamed answer that sends ``die_after_chunks`` content events (and, with
  ``die_mid_event``, half of the next one), then drops the connection without ending the body;
- ``SLOW``: a long stream with ``token_delay_seconds`` between events; ``disconnected`` is set (and
  ``disconnected_at`` is the ``time.monotonic()``) when the client goes away before the end.

``answer_delay_seconds`` delays every answer before its headers (for timeouts). Serve it with
``serve_fake`` (127.0.0.1 on a free port, or a Unix socket), and get a base URL where nothing listens
from ``nothing_listening``. ``serve_app`` serves any ASGI app the same way.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from tests.serving import UDS_ORIGIN, serve_app

__all__ = ["UDS_ORIGIN", "FakeUpstream", "Mode", "ReceivedRequest", "nothing_listening", "serve_app", "serve_fake"]

class Mode(str, Enum):
    NORMAL = "normal"
    GARBAGE = "garbage"
    ERROR = "error"
    DIE_MID_STREAM = "die_mid_stream"
    SLOW = "slow"


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    body: dict[str, Any] | None
    authorization: str | None
    raw: bytes = b""  # the body's bytes as they arrived


class FakeUpstream:
    """The fake's state and script; ``app`` serves it. Change the script between requests, not during one."""

    def __init__(self, *, models: tuple[str, ...] = ("fake-model",),
                 reply_text: str = "Hello from the fake upstream.") -> None:
        self.models = models
        self.reply_text = reply_text
        self.base_url = ""
        self.uds: Path | None = None
        self.app = self._build_app()
        self.generation = 0
        self.reset()

    def reset(self) -> None:
        """Back to ``NORMAL`` with nothing recorded.

        A request still being answered from before the reset (one the gateway gave up on while the fake
        waited, say) belongs to the test that sent it: it records nothing here and sets nothing of the next.
        """
        self.generation += 1
        self.mode = Mode.NORMAL
        self.answer_delay_seconds = 0.0
        self.error_status = 500
        self.error_body: dict[str, Any] | str | None = None
        self.error_headers: dict[str, str] = {}
        self.garbage_text = "<html><body>502 Bad Gateway</body></html> this is not JSON"
        self.die_after_chunks = 2
        self.die_mid_event = False
        self.token_delay_seconds = 0.05
        self.slow_token_count = 200
        self.requests: list[ReceivedRequest] = []
        self.sent: list[bytearray] = []
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._answer(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._answer(request, chat=False)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            self._record(request, None)
            return self._json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.models]})

        return app

    def _record(self, request: Request, body: dict[str, Any] | None, raw: bytes = b"") -> None:
        self.requests.append(ReceivedRequest(request.method, request.url.path, body,
                                             request.headers.get("authorization"), raw))

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
        response = JSONResponse(payload, status_code=status, headers=headers)
        self.sent.append(bytearray(response.body))
        return response

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        self._record(request, body, raw)
        generation = self.generation
        if self.answer_delay_seconds:
            await asyncio.sleep(self.answer_delay_seconds)
            if self.generation != generation:  # reset meanwhile: its test is over; nobody reads this answer
                return Response(status_code=503)
        if self.mode is Mode.GARBAGE:
            return PlainTextResponse(self.garbage_text)
        if self.mode is Mode.ERROR:
            return self._error()
        shape = _Shape(chat=chat, model=str(body.get("model", self.models[0])), prompt_tokens=_prompt_words(body))
        if not body.get("stream"):
            return self._json(200, shape.whole(self.reply_text, len(self._tokens())))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._stream(shape, include_usage)

    def _error(self) -> Response:
        body = self.error_body
        if isinstance(body, str):
            return Response(body, status_code=self.error_status, media_type="text/html", headers=self.error_headers)
        if body is None:
            body = {"error": {"message": "the fake upstream was told to fail", "type": "api_error",
                              "param": None, "code": "fake_failure"}}
        return self._json(self.error_status, body, self.error_headers)

    def _tokens(self) -> list[str]:
        if self.mode is Mode.SLOW:
            return [" tok"] * self.slow_token_count
        words = self.reply_text.split(" ")
        return [words[0], *(" " + word for word in words[1:])]

    def _stream(self, shape: _Shape, include_usage: bool) -> Response:
        tokens = self._tokens()
        dies = self.mode is Mode.DIE_MID_STREAM
        if dies:
            tokens = tokens[: self.die_after_chunks]
        events = [*shape.opening(), *(shape.delta(token) for token in tokens)]
        if dies:
            events += [b'data: {"id":"half-an-ev'] if self.die_mid_event else []
        else:
            events += [shape.finish(), *([shape.usage(len(tokens))] if include_usage else []), b"data: [DONE]\n\n"]
        delay = self.token_delay_seconds if self.mode is Mode.SLOW else 0.0
        return _ScriptedStream(self, events, delay_seconds=delay, complete=not dies)

    def saw_disconnect(self, generation: int) -> None:
        """A stream's client went away; only the test that started that stream hears of it."""
        if generation == self.generation and not self.disconnected.is_set():
            self.disconnected_at = time.monotonic()
            self.disconnected.set()


class _Shape:
    """OpenAI answer bodies for one request (chat or text completion)."""

    def __init__(self, *, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-fake-{time.monotonic_ns()}"
        self.created = int(time.time())

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if self.chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        )
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self._usage(completion_tokens)}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + JSONResponse(payload).body + b"\n\n"

    def opening(self) -> list[bytes]:
        if not self.chat:
            return []
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]

    def delta(self, text: str) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def finish(self) -> bytes:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}])

    def usage(self, completion_tokens: int) -> bytes:
        return self._chunk([], usage=self._usage(completion_tokens))


def _prompt_words(body: dict[str, Any]) -> int:
    texts = [str(m.get("content", "")) for m in body.get("messages", [])] or [str(body.get("prompt", ""))]
    return sum(len(text.split()) for text in texts)


class _ScriptedStream(Response):
    """Sends the events one by one, watching for the client to go away; incomplete means drop the connection.

    Written at the ASGI level so the disconnect is seen the moment uvicorn reports it, not whenever a
    cancelled generator happens to be collected.
    """

    media_type = "text/event-stream"

    def __init__(self, fake: FakeUpstream, events: list[bytes], *, delay_seconds: float, complete: bool) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache"})  # no body attribute: no content-length
        self.fake = fake
        self.generation = fake.generation
        self.records = fake.sent  # this generation's list, even if the fake is reset while it streams
        self.events = events
        self.delay_seconds = delay_seconds
        self.complete = complete

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = bytearray()
        self.records.append(sent)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            for event in self.events:
                if self.delay_seconds:
                    await asyncio.wait({gone}, timeout=self.delay_seconds)
                if gone.done():
                    self.fake.saw_disconnect(self.generation)
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
                sent += event
            if self.complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            # else uvicorn logs "ASGI callable returned without completing response" and closes the connection
        finally:
            gone.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@contextmanager
def serve_fake(fake: FakeUpstream | None = None, *, uds: Path | None = None) -> Iterator[FakeUpstream]:
    """Serve a fake upstream; its ``base_url`` (with /v1) and ``uds`` are set while it runs."""
    fake = fake or FakeUpstream()
    with serve_app(fake.app, uds=uds) as origin:
        fake.base_url, fake.uds = f"{origin}/v1", uds
        yield fake


@contextmanager
def nothing_listening() -> Iterator[str]:
    """A base URL on 127.0.0.1 whose port is held but not listening, so connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
