"""A fake OpenAI-compatible server: the yardstick of ``memserve bench``'s client overhead, and the test double of
every upstream (remote providers, runners, the servers bench measures).

``FakeOpenAI`` is a plain ASGI app serving ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``GET /v1/models``, answering in memserve's own shapes (``wire.schema.ResponseShape``). It counts words as
tokens for ``usage``, answers the models it was given (404 for others), and records every request (path, JSON
body, Authorization header, raw bytes) and every byte it answered. An answer is the reply text's words, or
exactly ``max_tokens`` of them (cycled, as vLLM's ``ignore_eos``) when the request gives one; a stream sends
one content chunk per token, then the finish chunk, the usage chunk when ``stream_options.include_usage``
asks, and ``data: [DONE]``.

By default it answers at once. A ``Script`` adds latencies through an injected ``sleep`` (a test drives it
from a virtual clock): a delay before any answer, a first-token delay once a slot is free, a gap before each
further token, at most ``slots`` answers generated at once and ``queue_limit`` waiting (429 beyond). It also
acts out failures: an error status, a body that is not JSON, an SSE error event mid-stream, or a connection
dropped mid-stream. A stream whose client goes away stops at once and sets ``disconnected``. A stream can
also stop at a hold point (``Script.hold_after_tokens``) until the test calls ``release()``: a test of a proxy in
front proves a token crossed it while the rest was not yet generated, with no sleep to tune.

Serve it with ``serve_fake`` (127.0.0.1 on a free port, or a Unix socket); ``serve_in_thread`` serves any
ASGI app the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memserve.errors import MemserveError, error_body
from memserve.wire.format import SSE_DONE, SSE_MEDIA_TYPE, retry_after, sse_event
from memserve.wire.routes import OPENAI_ROUTES
from memserve.wire.schema import FinishReason, ResponseShape, Usage

__all__ = [
    "HALF_EVENT",
    "NOT_JSON",
    "UDS_ORIGIN",
    "FakeOpenAI",
    "ReceivedRequest",
    "Script",
    "serve_fake",
    "serve_in_thread",
]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

NOT_JSON = "<html><body>502 Bad Gateway</body></html> this is not JSON"
"""What a proxy in front of an API answers when the API is down: ``Script(not_json=NOT_JSON)``."""


@dataclass(frozen=True)
class Script:
    """How the fake answers: latencies in seconds (on the injected ``sleep``), and failures to act out.

    Replace it whole between requests (``fake.script = Script(...)``), not during one.
    """

    reply_tokens: int | None = None
    """Content chunks of an answer whose request gives no ``max_tokens``; None: the reply text's words."""
    answer_delay_seconds: float = 0.0
    """Before the status line of every completion (an upstream too slow to answer)."""
    first_token_delays_seconds: Sequence[float] = ()
    """Streams: from getting a slot to the first chunk, cycled over the answers in arrival order; empty: none."""
    token_gaps_seconds: Sequence[float] = ()
    """Streams: gaps before the 2nd, 3rd, ... content chunk, cycled; empty: none."""
    slots: int | None = None
    """Streams generated at once; the others wait for a slot (None: no limit)."""
    queue_limit: int | None = None
    """With ``slots``: streams that may wait for a slot; more get 429 with Retry-After, as memserve's queue."""
    error_status: int | None = None
    """Answer every completion with this status, ``error_body`` and ``error_headers``."""
    error_body: Mapping[str, Any] | str | None = None
    """With ``error_status``: a dict is sent as JSON, a str as text/html; None: an OpenAI error."""
    error_headers: Mapping[str, str] = field(default_factory=dict)
    not_json: str | None = None
    """Answer every completion 200 with this text/plain body."""
    error_after_tokens: int | None = None
    """Streams: an SSE error event after this many content chunks, then ``[DONE]`` (as memserve does)."""
    die_after_tokens: int | None = None
    """Streams: drop the connection after this many content chunks, without ending the body."""
    die_mid_event: bool = False
    """With ``die_after_tokens``: send the first half of one more event before dropping the connection."""
    hold_after_tokens: int | None = None
    """Streams: after this many content chunks, set ``held`` and send nothing more until ``release()`` (or the
    client goes away)."""


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    body: dict[str, Any] | None
    authorization: str | None
    raw: bytes = b""  # the body's bytes as they arrived


HALF_EVENT = sse_event({"id": "half-an-event"})[:23]  # b'data: {"id":"half-an-ev'
"""What ``die_mid_event`` sends before dropping the connection."""
_DIE = object()  # in a stream's events: drop the connection here
_HOLD = object()  # in a stream's events: wait here for release()


class FakeOpenAI:
    """The ASGI app and its records. ``requests`` may be one list shared by several fakes to see the order."""

    def __init__(
        self,
        *,
        models: Sequence[str] = ("fake-model",),
        reply_text: str = "Hello from the fake upstream.",
        script: Script | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        requests: list[ReceivedRequest] | None = None,
    ) -> None:
        self.models = tuple(models)
        self.reply_text = reply_text
        self.sleep = sleep
        self.base_url = ""
        """With ``/v1``, while ``serve_fake`` serves it."""
        self.uds: Path | None = None
        self.generation = 0
        self.answers = 0
        self.in_flight = 0
        self._gate: tuple[int, asyncio.Semaphore] | None = None
        self.script = Script()
        self.requests: list[ReceivedRequest] = []
        self.sent: list[bytearray] = []
        """The bytes of each answer's body, as far as they were sent."""
        self.disconnected = threading.Event()
        """Set when a stream's client went away before its end."""
        self.disconnected_at: float | None = None
        """``time.monotonic()`` when that was noticed."""
        self.held = threading.Event()
        """Set when a stream reached its ``hold_after_tokens`` point."""
        self._released = threading.Event()
        self._holds: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.reset(script)
        if requests is not None:
            self.requests = requests

    def reset(self, script: Script | None = None) -> None:
        """A new script (the default one: everything answered at once) with nothing recorded.

        A request still being answered from before the reset (one the gateway gave up on while the fake
        waited, say) belongs to the test that sent it: it records nothing here and sets nothing of the next.
        """
        self.generation += 1
        self.script = script or Script()
        self.requests = []
        self.sent = []
        self.disconnected = threading.Event()
        self.disconnected_at = None
        self.release()  # a stream held by the test before belongs to it: let it finish
        self.held = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        """Let every stream waiting at its hold point go on, and any that reaches one later (thread-safe)."""
        self._released.set()
        holds, self._holds = self._holds, []
        for loop, event in holds:
            with contextlib.suppress(RuntimeError):  # its server stopped meanwhile: nothing waits there any more
                loop.call_soon_threadsafe(event.set)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        raw = await _read_body(receive) if method == "POST" else b""
        body = _json_object(raw) if method == "POST" else None
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        self.requests.append(ReceivedRequest(method, path, body, headers.get("authorization"), raw))
        answer = _Answer(send, self.sent)
        if (method, path) not in {(r.method, r.path) for r in OPENAI_ROUTES}:
            await answer.json(404, error_body(404, f"no route {method} {path}"))
        elif path == "/v1/models":
            await answer.json(
                200,
                {
                    "object": "list",
                    "data": [{"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.models],
                },
            )
        elif body is None:
            await answer.json(400, error_body(400, "the request body must be a JSON object"))
        else:
            await self._complete(body, answer, receive, chat=path.endswith("chat/completions"))

    async def _complete(self, body: dict[str, Any], answer: _Answer, receive: Receive, *, chat: bool) -> None:
        script, generation = self.script, self.generation
        if script.answer_delay_seconds:
            await self.sleep(script.answer_delay_seconds)
            if self.generation != generation:  # reset meanwhile: its test is over; nobody reads this answer
                await answer.json(503, error_body(503, "the fake was reset while this request waited"))
                return
        if script.not_json is not None:
            await answer.send(200, script.not_json.encode(), "text/plain; charset=utf-8")
            return
        if script.error_status is not None:
            await self._error(answer, script)
            return
        model = str(body.get("model"))
        if model not in self.models:
            await answer.json(404, error_body(404, f"model {model!r} is not served here", code="model_not_found"))
            return
        tokens, finish_reason = self._tokens(body, script)
        shape = ResponseShape(chat=chat, model=model)
        usage = Usage(_prompt_words(body), len(tokens))
        if not body.get("stream"):
            await answer.json(200, shape.response("".join(tokens), finish_reason, usage))
            return
        if (
            script.slots is not None
            and script.queue_limit is not None
            and self.in_flight >= script.slots + script.queue_limit
        ):
            error = error_body(429, "the fake's queue is full", code="queue_full")
            await answer.json(429, error, [(b"retry-after", retry_after(1).encode())])
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        index, self.answers = self.answers, self.answers + 1
        self.in_flight += 1
        try:
            events = self._events(script, index, shape, tokens, finish_reason, usage, include_usage)
            await self._stream(answer, receive, events, script.slots, generation)
        finally:
            self.in_flight -= 1

    async def _error(self, answer: _Answer, script: Script) -> None:
        status, body = script.error_status or 500, script.error_body
        headers = [(name.lower().encode(), value.encode()) for name, value in script.error_headers.items()]
        if isinstance(body, str):
            await answer.send(status, body.encode(), "text/html; charset=utf-8", headers)
            return
        if body is None:
            body = error_body(status, "the fake upstream was told to fail", code="fake_failure")
        await answer.json(status, dict(body), headers)

    def _tokens(self, body: dict[str, Any], script: Script) -> tuple[list[str], FinishReason]:
        """The answer's tokens: ``max_tokens`` of them when asked for (finish ``length``), else the reply."""
        words = self.reply_text.split(" ")
        asked = body.get("max_tokens") or body.get("max_completion_tokens")
        count = asked if isinstance(asked, int) and asked > 0 else script.reply_tokens or len(words)
        tokens = [(" " if index else "") + words[index % len(words)] for index in range(count)]
        return tokens, "length" if count == asked else "stop"

    @staticmethod
    def _events(
        script: Script,
        answer: int,
        shape: ResponseShape,
        tokens: list[str],
        finish_reason: FinishReason,
        usage: Usage,
        include_usage: bool,
    ) -> Iterator[bytes | float | object]:
        """The stream of the ``answer``-th streamed answer, with the sleeps before events as floats and ``_DIE``
        where the connection drops."""
        for index, token in enumerate(tokens):
            delay = (
                _cycle(script.first_token_delays_seconds, answer)
                if index == 0
                else _cycle(script.token_gaps_seconds, index - 1)
            )
            if delay > 0:
                yield delay
            if index == script.error_after_tokens:
                yield sse_event(error_body(500, "the fake was told to fail mid-stream", code="generation_failed"))
                yield SSE_DONE
                return
            if index == script.die_after_tokens:
                if script.die_mid_event:
                    yield HALF_EVENT
                yield _DIE
                return
            if index == script.hold_after_tokens:
                yield _HOLD
            if index == 0 and shape.chat:
                yield sse_event(shape.chunk(role=True))
            yield sse_event(shape.chunk(text=token))
        yield sse_event(shape.chunk(finish_reason=finish_reason))
        if include_usage:
            yield sse_event(shape.usage_chunk(usage))
        yield SSE_DONE

    async def _stream(
        self,
        answer: _Answer,
        receive: Receive,
        events: Iterator[bytes | float | object],
        slots: int | None,
        generation: int,
    ) -> None:
        """Send the events one by one, watching for the client to go away (the moment the server reports it,
        not whenever a cancelled generator happens to be collected)."""
        await answer.start(200, SSE_MEDIA_TYPE, [(b"cache-control", b"no-cache")])
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            async with self._slot(slots):
                for event in events:
                    if isinstance(event, float):
                        await self._sleep_unless(gone, event)
                    if gone.done():
                        self._saw_disconnect(generation)
                        return
                    if event is _DIE:
                        return  # uvicorn logs "ASGI callable returned without completing response" and closes
                    if event is _HOLD:
                        await self._hold(gone)
                        if gone.done():
                            self._saw_disconnect(generation)
                            return
                    if isinstance(event, bytes):
                        await answer.body(event, more=True)
            await answer.body(b"", more=False)
        except OSError:  # the client went away; an ASGI 2.4 server says so by failing send
            self._saw_disconnect(generation)
        finally:
            gone.cancel()

    @asynccontextmanager
    async def _slot(self, slots: int | None) -> AsyncIterator[None]:
        """One of ``slots`` places to generate in (the gate is made anew when a script changes their number)."""
        if slots is None:
            yield
            return
        if self._gate is None or self._gate[0] != slots:
            self._gate = (slots, asyncio.Semaphore(slots))
        async with self._gate[1]:
            yield

    async def _sleep_unless(self, gone: asyncio.Future[None], seconds: float) -> None:
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait({sleeper, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    async def _hold(self, gone: asyncio.Future[None]) -> None:
        """Wait for ``release()`` or the client to go away; ``held`` is set first, so a test may wait for it."""
        released, hold = self._released, (asyncio.get_running_loop(), asyncio.Event())
        self._holds.append(hold)
        self.held.set()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(hold[1].wait())
        either: set[asyncio.Future[Any]] = {waiter, gone}
        try:
            if not released.is_set():  # else released before this stream got here
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(ValueError):  # release() took it already
                self._holds.remove(hold)

    def _saw_disconnect(self, generation: int) -> None:
        """A stream's client went away; only the test that started that stream hears of it."""
        if generation == self.generation and not self.disconnected.is_set():
            self.disconnected_at = time.monotonic()
            self.disconnected.set()


class _Answer:
    """Sends one response and records its body's bytes in ``records`` (the generation's list at the start)."""

    def __init__(self, send: Send, records: list[bytearray]) -> None:
        self._send = send
        self._records = records
        self._sent = bytearray()

    async def start(self, status: int, content_type: str, headers: Headers | None = None) -> None:
        self._records.append(self._sent)
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), *(headers or [])],
            }
        )

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
        self._sent += data

    async def send(self, status: int, data: bytes, content_type: str, headers: Headers | None = None) -> None:
        """A whole body."""
        await self.start(status, content_type, [(b"content-length", str(len(data)).encode()), *(headers or [])])
        await self.body(data, more=False)

    async def json(self, status: int, payload: Mapping[str, Any], headers: Headers | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        await self.send(status, data, "application/json", headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop, said in the lifespan protocol (a server or test client may ask)."""
    while True:
        kind = (await receive())["type"]
        await send({"type": f"{kind}.complete"})
        if kind == "lifespan.shutdown":
            return


def _cycle(delays: Sequence[float], index: int) -> float:
    return float(delays[index % len(delays)]) if delays else 0.0


async def _read_body(receive: Receive) -> bytes:
    raw = bytearray()
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(raw)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _prompt_words(body: dict[str, Any]) -> int:
    texts = [str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict)]
    return sum(len(text.split()) for text in texts or [str(body.get("prompt", ""))])


@contextmanager
def serve_fake(fake: FakeOpenAI | None = None, *, uds: Path | None = None, http: str = "auto") -> Iterator[FakeOpenAI]:
    """Serve a fake; its ``base_url`` (with /v1) and ``uds`` are set while it runs."""
    fake = fake or FakeOpenAI()
    with serve_in_thread(fake, uds=uds, http=http) as origin:
        fake.base_url, fake.uds = f"{origin}/v1", uds
        yield fake


UDS_ORIGIN = "http://fake-upstream"
"""The origin of a server on a Unix socket (the host is not used for routing)."""


@contextmanager
def serve_in_thread(
    app: Any, *, uds: Path | None = None, lifespan: bool = False, http: str = "auto", hint: str = ""
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a daemon thread, on a free 127.0.0.1 port or a Unix socket; yield its
    origin (a socket's is ``UDS_ORIGIN``: reach it with ``httpx.HTTPTransport(uds=...)``).

    ``hint`` ends the message of the MemserveError raised when it does not start.
    """
    import uvicorn  # only when serving: memserve bench imports this module without starting a server

    sock: socket.socket | None = None
    common: dict[str, Any] = {
        "log_config": None,
        "log_level": "warning",
        "access_log": False,
        "http": http,
        "ws": "none",
        "lifespan": "on" if lifespan else "off",
        "timeout_graceful_shutdown": 3,
    }
    if uds is not None:
        config = uvicorn.Config(app, uds=str(uds), **common)
        origin = UDS_ORIGIN
    else:
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it Nagle and delayed ACKs add
        # ~40 ms to every answer uvicorn writes in two parts (headers, then body)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, **common)
        origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": None if sock is None else [sock]},
        daemon=True,
        name=f"memserve-serve {origin}",
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                where = uds if uds is not None else origin
                raise MemserveError(f"a server in this process did not start on {where}{'; ' + hint if hint else ''}")
            time.sleep(0.005)
        yield origin
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if sock is not None:
            sock.close()
