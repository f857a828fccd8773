"""A fake OpenAI-compatible server that streams scripted tokens: the client-overhead yardstick and a test double.

``FakeServer`` is a plain ASGI app with ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models``. Each streamed answer sends ``max_tokens`` one-word content chunks (then the finish
chunk, the usage chunk and ``data: [DONE]``). By default it sends them at once: the benchmark serves it
on 127.0.0.1 to measure the fastest the client itself can go. A ``Script`` adds latencies through an
injected ``sleep`` (a test drives it from a virtual clock): a first-token delay once a slot is free,
then a gap before each further token, with at most ``slots`` answers generated at once and at most
``queue_limit`` waiting (429 beyond), or an SSE error event mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from memserve.errors import MemserveError

__all__ = ["FakeServer", "Script", "serve_in_thread"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class Script:
    """How the fake answers: latencies in seconds (on the injected ``sleep``), and failures to act out."""

    first_token_delays_seconds: Sequence[float] = ()
    """From getting a slot to the first content chunk, cycled over the answers in arrival order; empty: none."""
    token_gaps_seconds: Sequence[float] = ()
    """Gaps before the 2nd, 3rd, ... content chunk, cycled; empty: none."""
    slots: int | None = None
    """Answers generated at once; the others wait for a slot (None: no limit)."""
    queue_limit: int | None = None
    """With ``slots``: answers that may wait for a slot; more get 429 with Retry-After, as memserve's queue."""
    default_max_tokens: int = 16
    error_after_tokens: int | None = None
    """Send an SSE error event after this many content chunks, then ``[DONE]`` (as memserve does)."""


class FakeServer:
    """The ASGI app. ``received`` collects every request body (pass one list to several fakes to see the order)."""

    def __init__(self, *, models: Sequence[str] = ("fake-model",), script: Script = Script(),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 received: list[dict[str, Any]] | None = None) -> None:
        self.models = tuple(models)
        self.script = script
        self.sleep = sleep
        self.received = received if received is not None else []
        self.answers = 0
        self.in_flight = 0
        self._slots: AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(script.slots) if script.slots else nullcontext())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"].rstrip("/"))
        if route == ("GET", "/v1/models"):
            await _send_json(send, 200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.models]})
        elif route in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            await self._complete(await _read_json(receive), send, chat=route[1].endswith("chat/completions"))
        else:
            await _send_json(send, 404, _error(f"no route {route[0]} {route[1]}", "not_found_error"))

    async def _complete(self, body: dict[str, Any], send: Send, *, chat: bool) -> None:
        self.received.append(body)
        model = str(body.get("model"))
        if model not in self.models:
            await _send_json(send, 404, _error(f"model {model!r} is not served here", "not_found_error",
                                               "model_not_found"))
            return
        shape = _Shape(chat=chat, model=model, prompt_tokens=_prompt_words(body))
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.script.default_max_tokens)
        if not body.get("stream"):
            await _send_json(send, 200, shape.whole(tokens))
            return
        script = self.script
        if script.slots is not None and script.queue_limit is not None \
                and self.in_flight >= script.slots + script.queue_limit:
            await _send_json(send, 429, _error("the fake's queue is full", "rate_limit_error", "queue_full"),
                             [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self._stream(shape, tokens, send)
        finally:
            self.in_flight -= 1

    async def _stream(self, shape: _Shape, tokens: int, send: Send) -> None:
        answer, self.answers = self.answers, self.answers + 1
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        try:
            async with self._slots:
                for event in self._events(shape, tokens, answer):
                    if isinstance(event, float):
                        await self.sleep(event)
                    else:
                        await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away; uvicorn tells us so by raising from send
            return

    def _events(self, shape: _Shape, tokens: int, answer: int) -> Iterator[bytes | float]:
        """The stream, with the sleeps between events as floats."""
        script = self.script
        yield shape.opening()
        for index in range(tokens):
            delay = _cycle(script.first_token_delays_seconds, answer) if index == 0 \
                else _cycle(script.token_gaps_seconds, index - 1)
            if delay > 0:
                yield delay
            if script.error_after_tokens is not None and index == script.error_after_tokens:
                yield _sse(_error("the fake was told to fail mid-stream", "api_error", "generation_failed"))
                yield b"data: [DONE]\n\n"
                return
            yield shape.delta(f" tok{index}" if index else "tok0")
        yield shape.finish()
        yield shape.usage(tokens)
        yield b"data: [DONE]\n\n"


def _cycle(delays: Sequence[float], index: int) -> float:
    return delays[index % len(delays)] if delays else 0.0


def _error(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _read_json(receive: Receive) -> dict[str, Any]:
    raw = bytearray()
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def _prompt_words(body: dict[str, Any]) -> int:
    texts = [str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict)]
    return sum(len(text.split()) for text in texts or [str(body.get("prompt", ""))])


class _Shape:
    """The OpenAI chunks of one answer (chat or text completion)."""

    def __init__(self, *, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-fake-{time.monotonic_ns()}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _chunk(self, choice: dict[str, Any] | None, **extra: Any) -> bytes:
        return _sse({**self.head, "choices": [] if choice is None else [{"index": 0, **choice}], **extra})

    def opening(self) -> bytes:
        if self.chat:
            return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        return self._chunk({"text": "", "logprobs": None, "finish_reason": None})

    def delta(self, text: str) -> bytes:
        if self.chat:
            return self._chunk({"delta": {"content": text}, "finish_reason": None})
        return self._chunk({"text": text, "logprobs": None, "finish_reason": None})

    def finish(self) -> bytes:
        if self.chat:
            return self._chunk({"delta": {}, "finish_reason": "length"})
        return self._chunk({"text": "", "logprobs": None, "finish_reason": "length"})

    def usage(self, completion_tokens: int) -> bytes:
        return self._chunk(None, usage=self._usage(completion_tokens))

    def whole(self, tokens: int) -> dict[str, Any]:
        text = "".join(f" tok{i}" if i else "tok0" for i in range(tokens))
        choice = ({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [{"index": 0, **choice, "finish_reason": "length"}], "usage": self._usage(tokens)}


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (a free port) in a daemon thread; yield its origin."""
    import uvicorn

    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it Nagle and delayed ACKs add
    # ~40 ms to answers written in several parts
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, ws="none",
                            lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="memserve-bench-fake")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise MemserveError("the fake server for the client-overhead measurement did not start on "
                                    "127.0.0.1; pass --no-overhead to skip that measurement")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
