"""Forward an OpenAI-compatible request to an upstream and pass its answer back, streaming included.

An upstream is a runner process (HTTP on a Unix socket) or a remote provider (Groq, a vLLM server):
the gateway speaks to both the same way. The hot path adds as little as it can: the body goes out as
the client's own bytes when nothing in it changed (JSON otherwise), a streamed answer is relayed byte
for byte as it arrives (never re-parsed), and a whole answer is only checked to be JSON and passed
back as the upstream's own bytes.

What can go wrong, and what the client sees::

    cannot connect, timed out, closed before answering   UpstreamUnavailable (502), names the upstream and URL
    4xx/5xx with an OpenAI error body                    that status and body; Retry-After kept
    4xx/5xx with other JSON (FastAPI, old vLLM)          that status, re-wrapped in the OpenAI error shape
    4xx/5xx with an engine's own error object            the same, re-wrapped: llama.cpp and vLLM put an int
      (llama.cpp's type exceed_context_size_error,       status in ``code`` and their own names in ``type``;
      vLLM's BadRequestError, code 400)                  the type becomes OpenAI's for the status, their type
                                                         the code (llama.cpp's context overflow: OpenAI's
                                                         ``context_length_exceeded``, with its numbers)
    an answer that is not JSON, or a stream not SSE      BadUpstream (502), names status and the body's start
    the stream breaks off half-way                       the SSE stream ends cleanly: an error event, [DONE]

``on_done`` (the pool gives its lease back there) runs exactly once however the exchange ends, the
client hanging up mid-stream included; the upstream response is then closed at once, so a runner
sees its client go away and frees the sequence.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.responses import Response

from memserve.errors import BadUpstream, MemserveError, UpstreamUnavailable, error_body
from memserve.wire.http import SSE_DONE, SSE_MEDIA_TYPE, EventStream, error_body_response, sse_event

__all__ = ["EXCERPT_CHARS", "StreamUsage", "Upstream", "WholeAnswer", "forward"]

EXCERPT_CHARS = 200
"""How much of a malformed answer an error message quotes."""

_KEPT_ERROR_HEADERS = ("retry-after",)
_OPENAI_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "conflict_error",
        "unprocessable_entity_error",
        "rate_limit_error",
        "insufficient_quota",
        "api_error",
        "server_error",
    }
)
"""The ``type``s of OpenAI's error objects (what its client and the tools built on it know)."""
_ENGINE_CODES = {"exceed_context_size_error": "context_length_exceeded"}
"""An engine's error type → OpenAI's code for the same failure."""
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
_DONE_ENDS = (b"[DONE]\n\n", b"[DONE]\r\n\r\n")
_TAIL_BYTES = 16


@dataclass(frozen=True)
class Upstream:
    """Where a request goes: a runner on a Unix socket or a remote OpenAI-compatible provider.

    ``name`` starts every message about it ("provider groq", "runner demo (socket /run/x.sock)").
    ``base_url`` includes ``/v1``; a runner on a socket uses any host, e.g. ``http://runner/v1``.
    The client belongs to the caller (one per runner or provider, so connections are pooled) and its
    timeouts apply. The key is sent as a bearer token and never shown in messages or ``repr``.

    ``transport``, when given (a runner's, the client's own), takes generation requests directly: a
    runner needs none of the client's cookie, redirect and auth handling, which a py-spy of the gateway
    put at a third of the time it spends sending a request.
    """

    name: str
    base_url: str
    client: httpx.AsyncClient
    api_key: str | None = field(default=None, repr=False)
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)


class WholeAnswer(Response):
    """A whole JSON answer passed back as the upstream's own bytes, with the object they parse to (``payload``),
    so that whoever meters it (``RequestRecord.finish``: its usage, its error) does not parse it again."""

    def __init__(self, raw: bytes, payload: Any, *, status_code: int, headers: Mapping[str, str]) -> None:
        super().__init__(raw, status_code=status_code, media_type="application/json", headers=headers)
        self.payload = payload


_USAGE_EVENT_MARKS = (b'"choices":[]', b'"choices": []')
_TEXT_MARKS = (b'"content":"', b'"content": "', b'"text":"', b'"text": "')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_EMPTY_TEXT_MARKS = (b'"content":""', b'"content": ""', b'"text":""', b'"text": ""')


class StreamUsage:
    """Reads the token counts out of a relayed stream, for metering, without re-parsing it.

    The gateway asks every upstream for ``stream_options.include_usage``: the usage chunk (no choices,
    before ``[DONE]``) is then parsed, and dropped when the client did not ask for it itself (``strip``).
    Until it has been seen, the relay passes whole events only (an event split across chunks waits for its
    end, which upstreams rarely make it do), so that a usage event is found and cut out whole whichever
    delimiter (``\\n\\n``, ``\\r\\n\\r\\n``) the upstream uses; chunks that carry no usage event are passed unparsed.
    ``text_events`` counts the events that carry text, which is what a stream cut short is metered by
    (memserve's runner sends one per token that adds text). ``rename`` (the upstream's ``"model":`` member and
    the client's) is applied to the events it passes, whole until the usage event (the last with a model).
    """

    __slots__ = ("_held", "on_text", "rename", "strip", "text_events", "usage")

    def __init__(self, *, strip: bool, on_text: Callable[[int], None] | None = None) -> None:
        """``on_text`` hears of each chunk's text events as it passes (a key's limits count them as they stream)."""
        self.strip = strip
        self.on_text = on_text
        self.usage: dict[str, Any] | None = None
        self.text_events = 0
        self.rename: tuple[bytes, bytes] | None = None
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (and of what was held) the client should get now."""
        passed = self._feed(chunk)
        return passed.replace(*self.rename) if self.rename is not None else passed

    def _feed(self, chunk: bytes) -> bytes:
        texts = sum(chunk.count(m) for m in _TEXT_MARKS) - sum(chunk.count(m) for m in _EMPTY_TEXT_MARKS)
        if texts > 0:
            self.text_events += texts
            if self.on_text is not None:
                self.on_text(texts)
        if self.usage is not None and not self._held:
            return chunk  # the usage was seen: nothing left to look for
        data, self._held = self._held + chunk, b""
        ends = list(_EVENT_END.finditer(data))
        cut = ends[-1].end() if ends else 0
        data, self._held = data[:cut], data[cut:]
        if not any(mark in data for mark in _USAGE_EVENT_MARKS):
            return data
        kept, start = [], 0
        for end in ends:
            event, start = data[start : end.start()], end.end()
            usage = _usage_of(event) if any(mark in event for mark in _USAGE_EVENT_MARKS) else None
            if usage is not None:
                self.usage = usage
                if self.strip:
                    continue
            kept.append(event + end.group())
        return b"".join(kept)

    def rest(self) -> bytes:
        """What is held when the stream ends: an unfinished event, passed on as it came."""
        held, self._held = self._held, b""
        return held.replace(*self.rename) if self.rename is not None else held


def _usage_of(event: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of one ``data: {...}`` event, or None."""
    _, _, data = event.partition(b"data:")
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


async def forward(
    upstream: Upstream,
    path: str,
    body: dict[str, Any] | bytes,
    *,
    stream: bool,
    on_done: Callable[[], None] | None = None,
    headers: Mapping[str, str] | None = None,
    meter: StreamUsage | None = None,
    model: tuple[str, str] | None = None,
) -> Response:
    """POST ``body`` (a JSON object, or the bytes of one) to ``upstream.base_url + path`` and return the
    answer for our client.

    ``headers`` are added to our response (e.g. ``x-memserve-fallback``); ``meter`` sees a stream's chunks
    (``StreamUsage``). ``model`` (the upstream's name, the client's) renames the answer's ``model`` for an
    upstream that answers its own name whatever was asked (llama-server, its alias); a stream is renamed by its
    meter. Raises ``UpstreamUnavailable``
    or ``BadUpstream`` before any byte is sent to the client; after that, failures travel in the stream.
    """
    done = _Once(on_done)
    relaying = False
    rename = None if model is None else (_model_member(model[0]), _model_member(model[1]))
    if meter is not None:
        meter.rename = rename
    try:
        answer = await _open(upstream, path, body, stream=stream)
        if stream and answer.status_code == 200:
            relay = await _start_relay(upstream, answer, done, headers, meter)
            relaying = True
            return relay
        return await _answer_whole(upstream, answer, headers, rename)
    finally:
        if not relaying:
            done()


class _Once:
    """A callback that runs at most once, however many endings race to call it."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


@functools.lru_cache(maxsize=1024)
def _url(base_url: str, path: str) -> httpx.URL:
    """The parsed URL of ``base_url + path``: httpx parses a string URL in Python on every request, which
    took as long as the rest of building the request (30–40 µs of 70–80 here)."""
    return httpx.URL(base_url.rstrip("/") + path)


@functools.lru_cache(maxsize=1024)
def _headers(stream: bool, api_key: str | None) -> httpx.Headers:
    """The request's headers, built once per kind (httpx copies them into each request)."""
    headers = {"Accept": SSE_MEDIA_TYPE if stream else "application/json", "Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Headers(headers)


async def _open(upstream: Upstream, path: str, body: dict[str, Any] | bytes, *, stream: bool) -> httpx.Response:
    """Send the request and wait for the status line and headers only."""
    request_headers = _headers(stream, upstream.api_key)
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    client, url = upstream.client, _url(upstream.base_url, path)
    try:
        if upstream.transport is not None:
            request = httpx.Request(
                "POST", url, content=content, headers=request_headers, extensions={"timeout": client.timeout.as_dict()}
            )
            return await upstream.transport.handle_async_request(request)
        return await client.send(
            client.build_request("POST", url, content=content, headers=request_headers), stream=True
        )
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(_unreachable_message(upstream, exc)) from exc


def _model_member(name: str) -> bytes:
    """``"model":"NAME"`` as a compact JSON writer (llama-server's) puts it. Inside a JSON string every quote is
    escaped, so these bytes occur only as the member itself."""
    return b'"model":' + json.dumps(name, ensure_ascii=False).encode()


async def _answer_whole(
    upstream: Upstream,
    answer: httpx.Response,
    headers: Mapping[str, str] | None,
    rename: tuple[bytes, bytes] | None = None,
) -> Response:
    """A whole JSON answer, passed back as the upstream's bytes (``rename``d) with its status."""
    raw = await _read_all(upstream, answer)
    if rename is not None:
        raw = raw.replace(*rename)
    try:
        payload = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise BadUpstream(_not_json_message(upstream, answer, raw)) from exc
    out_headers = dict(headers or {})
    if answer.status_code >= 400:
        out_headers.update((name, answer.headers[name]) for name in _KEPT_ERROR_HEADERS if name in answer.headers)
        if not _is_openai_error(payload):
            error = _rewrapped_error(upstream, answer.status_code, payload, raw)
            return error_body_response(answer.status_code, error, out_headers)
    return WholeAnswer(raw, payload, status_code=answer.status_code, headers=out_headers)


async def _read_all(upstream: Upstream, answer: httpx.Response) -> bytes:
    try:
        return await answer.aread()
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(
            f"{upstream.name} at {upstream.base_url} broke off its answer ({_describe(exc)}). "
            f"Retry the request; if it keeps failing, check that {upstream.name} is still running."
        ) from exc
    except httpx.DecodingError as exc:
        raise BadUpstream(
            f"{upstream.name} answered {answer.status_code} with a body that cannot be decoded "
            f"({_describe(exc)}). Expected an OpenAI-compatible JSON answer."
        ) from exc
    finally:
        if not answer.is_closed:  # reading to the end closed it already; an error or a cancel did not
            with anyio.CancelScope(shield=True):
                await answer.aclose()


async def _expect_event_stream(upstream: Upstream, answer: httpx.Response) -> None:
    """Raise ``BadUpstream`` (after closing the answer) unless it is a server-sent event stream."""
    content_type = answer.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() == SSE_MEDIA_TYPE:
        return
    start = b""
    try:
        async for chunk in answer.aiter_bytes():
            start += chunk
            if len(start) >= EXCERPT_CHARS:
                break
    except httpx.HTTPError:
        pass  # the excerpt is a courtesy; the error below is the point
    finally:
        with anyio.CancelScope(shield=True):
            await answer.aclose()
    raise BadUpstream(
        f"{upstream.name} answered a streamed request with {content_type or 'no content type'!r} instead of "
        f"text/event-stream: {_excerpt(start)!r}. Check that {upstream.base_url} is an OpenAI-compatible API "
        "that supports stream=true, or retry without streaming."
    )


async def _start_relay(
    upstream: Upstream,
    answer: httpx.Response,
    done: _Once,
    headers: Mapping[str, str] | None,
    meter: StreamUsage | None = None,
) -> EventStream:
    """The relay that owns ``answer`` and ``done`` from here on; closes the answer if it cannot be built.

    However the relay ends (the client hanging up included), it closes the upstream answer, so the upstream
    sees the disconnect at once, and ``done`` runs.
    """
    await _expect_event_stream(upstream, answer)

    async def close() -> None:
        try:
            await answer.aclose()
        finally:
            done()

    try:
        return EventStream(_relay_events(answer, upstream, meter), on_close=close, headers=headers)
    except BaseException:  # e.g. a header value that is not latin-1
        with anyio.CancelScope(shield=True):
            await answer.aclose()
        raise


async def _relay_events(
    answer: httpx.Response, upstream: Upstream, meter: StreamUsage | None = None
) -> AsyncGenerator[bytes, None]:
    """The upstream's bytes unchanged (but a usage chunk the client did not ask for, see ``StreamUsage``); if it
    breaks off, end the stream with an error event and [DONE]."""
    tail = b""
    relayed_bytes = 0
    try:
        async for chunk in answer.aiter_bytes():
            tail = chunk[-_TAIL_BYTES:] if len(chunk) >= _TAIL_BYTES else (tail + chunk)[-_TAIL_BYTES:]
            relayed_bytes += len(chunk)
            if meter is not None:
                chunk = meter.feed(chunk)
                if not chunk:
                    continue
            yield chunk
        if meter is not None and (held := meter.rest()):
            yield held
    except (httpx.TransportError, httpx.DecodingError) as exc:
        if meter is not None and (held := meter.rest()):
            yield held
        if tail.endswith(_DONE_ENDS):
            return  # the answer was complete; only the connection's goodbye went wrong
        if tail and not tail.endswith(_EVENT_ENDS):
            yield b"\n\n"
        yield sse_event(_broken_stream_error(upstream, exc, relayed_bytes).to_openai())
        yield SSE_DONE


def _broken_stream_error(upstream: Upstream, exc: httpx.HTTPError, relayed_bytes: int) -> MemserveError:
    if isinstance(exc, httpx.DecodingError):
        return BadUpstream(
            f"{upstream.name} sent a stream that cannot be decoded after {relayed_bytes} bytes ({_describe(exc)}); "
            "the answer above is incomplete. Retry the request, or retry without streaming."
        )
    what = "stopped sending" if isinstance(exc, httpx.TimeoutException) else "broke off the stream"
    return UpstreamUnavailable(
        f"{upstream.name} {what} after {relayed_bytes} bytes ({_describe(exc)}); the answer above is incomplete. "
        f"Retry the request; if it keeps failing, check that {upstream.name} is still running."
    )


def _unreachable_message(upstream: Upstream, exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        what, todo = "did not answer in time", "It may be overloaded or stuck: retry later, or raise its timeout."
    elif isinstance(exc, httpx.ConnectError):
        what, todo = "cannot be reached", "Check that it is running and that its base URL is right, then retry."
    else:
        what, todo = "dropped the connection before answering", "It may have crashed: check that it is running."
    return f"{upstream.name} at {upstream.base_url} {what} ({_describe(exc)}). {todo}"


def _not_json_message(upstream: Upstream, answer: httpx.Response, raw: bytes) -> str:
    content_type = answer.headers.get("content-type") or "no content type"
    return (
        f"{upstream.name} answered {answer.status_code} ({content_type}) with a body that is not JSON: "
        f"{_excerpt(raw)!r}. Expected an OpenAI-compatible answer; check that {upstream.base_url} is an "
        "OpenAI-compatible API (base URLs usually end in /v1)."
    )


def _is_openai_error(payload: Any) -> bool:
    """OpenAI's own shape: an ``error`` object with a text message, one of OpenAI's types, a text or no code."""
    error = payload.get("error") if isinstance(payload, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and error.get("type") in _OPENAI_ERROR_TYPES
        and (error.get("code") is None or isinstance(error.get("code"), str))
    )


def _rewrapped_error(upstream: Upstream, status_code: int, payload: Any, raw: bytes) -> dict[str, Any]:
    """An error body in the OpenAI shape for an upstream that used another one: FastAPI's ``detail``, old vLLM's
    top-level fields, or an engine's error object with its own type names and an int code (llama.cpp, vLLM)."""
    fields: dict[str, Any] = payload if isinstance(payload, dict) else {}
    if isinstance(fields.get("error"), dict):
        fields = fields["error"]
    detail = fields.get("message") if isinstance(fields.get("message"), str) else None
    engine_type = fields.get("type") if isinstance(fields.get("type"), str) else None
    code = fields.get("code") if isinstance(fields.get("code"), str) else None
    if code is None and engine_type is not None and engine_type not in _OPENAI_ERROR_TYPES:
        code = _ENGINE_CODES.get(engine_type, engine_type)
    prompt_tokens, context_tokens = fields.get("n_prompt_tokens"), fields.get("n_ctx")
    if code == "context_length_exceeded" and isinstance(prompt_tokens, int) and isinstance(context_tokens, int):
        message = (
            f"{upstream.name}: the prompt is {prompt_tokens} tokens, more than the {context_tokens} tokens of context "
            "each of its sequences has; shorten the prompt, or load the model with a larger context "
            "(POST /api/load with 'context', or the model's 'context' in the config)"
        )
    elif detail is not None:
        message = f"{upstream.name} answered {status_code}: {detail}"
    else:
        message = f"{upstream.name} answered {status_code} without an OpenAI error body: {_excerpt(raw)!r}"
    param = fields.get("param") if isinstance(fields.get("param"), str) else None
    error_type = engine_type if engine_type in _OPENAI_ERROR_TYPES else None
    return error_body(status_code, message, param=param, code=code, error_type=error_type)


def _excerpt(raw: bytes) -> str:
    """The start of a body, whitespace collapsed, for one-line messages."""
    return " ".join(raw[: EXCERPT_CHARS * 2].decode("utf-8", "replace").split())[:EXCERPT_CHARS]


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
