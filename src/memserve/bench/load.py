"""The load generator: streams OpenAI requests with httpx and records when each chunk arrived.

Time comes from an injected ``clock`` (seconds, any origin) and waits go through an injected ``sleep``,
so tests drive both from a virtual clock and get exact latencies; the defaults are
``time.perf_counter`` and ``asyncio.sleep``.

A failed request is recorded, never raised, with one of these error kinds:

- ``connect``: the server cannot be reached (refused, DNS, connect timeout);
- ``timeout``: no complete answer within ``--timeout``;
- ``http_<status>``: the server answered an HTTP error (``http_404``, ``http_429``, ``http_500``, ...);
- ``bad_stream``: a 2xx that is not an SSE stream, an event that is not JSON, or a stream that ends with
  neither ``data: [DONE]`` nor a ``finish_reason`` (``transformers serve`` sends no ``[DONE]``: a stream
  that gave its finish reason and then closed is complete);
- ``stream_error``: an SSE ``error`` event after the stream started (e.g. memserve's runner died);
- ``disconnect``: the connection dropped mid-response;
- ``transport``: any other HTTP client failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import httpx

from memserve.bench.prompts import Prompt
from memserve.bench.stats import RequestRecord
from memserve.net import is_loopback, normalize_base_url

__all__ = [
    "Clock",
    "LoadGenerator",
    "Sleep",
    "Target",
    "list_models",
    "make_client",
    "normalize_base_url",
    "poisson_arrivals_seconds",
    "stream_request",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnRecord = Callable[[RequestRecord], None]
CONNECT_TIMEOUT_SECONDS = 10.0
SNIPPET_CHARS = 160


@dataclass(frozen=True)
class Target:
    """A server under test: an OpenAI-compatible base URL (ending in ``/v1``) and the model to ask for."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    endpoint: str = "chat"
    """``chat`` (``/v1/chat/completions``) or ``completions`` (``/v1/completions``)."""

    @property
    def path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"

    def describe(self) -> str:
        """``A: demo at http://127.0.0.1:8123/v1``."""
        return f"{self.name}: {self.model} at {self.base_url}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "model": self.model, "endpoint": self.path}


def make_client(
    target: Target, *, timeout_seconds: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A client with no connection limit (a pool queue would inflate TTFT), keyed for ``target``.

    Proxy variables are ignored for a loopback URL, as curl does: a corporate proxy must not carry
    ``127.0.0.1``.
    """
    headers = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.AsyncClient(
        transport=transport,
        headers=headers,
        trust_env=not is_loopback(httpx.URL(target.base_url).host),
        timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, CONNECT_TIMEOUT_SECONDS)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


def request_body(target: Target, prompt: Prompt, *, ignore_eos: bool) -> dict[str, Any]:
    """The streaming request for one prompt, asking for usage so token counts come from the server."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": prompt.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        body["messages"] = prompt.chat_messages()
    else:
        body["prompt"] = prompt.text or ""
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: generate exactly max_tokens
    return body


class _Failure(Exception):
    """A request failed in a known way; caught in ``stream_request`` and recorded."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


async def stream_request(
    client: httpx.AsyncClient,
    target: Target,
    prompt: Prompt,
    *,
    clock: Clock,
    timeout_seconds: float,
    ignore_eos: bool = False,
) -> RequestRecord:
    """Send one streaming request and record its chunk times; failures are recorded, never raised."""
    record = RequestRecord(send_seconds=clock(), local_prompt_tokens=prompt.prompt_tokens)
    body = request_body(target, prompt, ignore_eos=ignore_eos)
    try:
        await asyncio.wait_for(
            _stream_into(record, client, target.base_url + target.path, body, clock), timeout_seconds
        )
    except _Failure as exc:
        record.fail(exc.kind, exc.message)
    except (TimeoutError, httpx.TimeoutException) as exc:
        if isinstance(exc, httpx.ConnectTimeout):
            record.fail("connect", f"could not connect to {target.base_url} within {CONNECT_TIMEOUT_SECONDS:g} s")
        else:
            record.fail("timeout", f"no complete answer within --timeout {timeout_seconds:g} s")
    except httpx.ConnectError as exc:
        record.fail("connect", f"cannot connect to {target.base_url} ({_why(exc)})")
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        record.fail("disconnect", f"the connection dropped mid-response ({_why(exc)})")
    except httpx.HTTPError as exc:
        record.fail("transport", f"{type(exc).__name__}: {_why(exc)}")
    record.finish_seconds = clock()
    return record


def _why(exc: BaseException) -> str:
    """The root cause in a few words: anyio wraps a refused connection in "All connection attempts failed"."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


async def _stream_into(
    record: RequestRecord, client: httpx.AsyncClient, url: str, body: dict[str, Any], clock: Clock
) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code >= 400:
            raw = await response.aread()
            raise _Failure(f"http_{response.status_code}", f"HTTP {response.status_code}: {_error_text(raw)}")
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raw = await response.aread()
            raise _Failure(
                "bad_stream",
                f"HTTP {response.status_code} {content_type or 'without a content-type'}, "
                f"not an SSE stream: {_snippet(raw)!r}",
            )
        finished = False
        async for data in sse_data(response.aiter_lines()):
            if data == "[DONE]":
                return
            finished = _take_chunk(record, _parse_event(data), clock) or finished
    if not finished:
        raise _Failure(
            "bad_stream", "the stream ended without a finish_reason or data: [DONE]; the answer is incomplete"
        )


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines); other fields ignored."""
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _parse_event(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise _Failure("bad_stream", f"an SSE event is not JSON: {_snippet(data.encode())!r}") from None
    if not isinstance(chunk, dict):
        raise _Failure("bad_stream", f"an SSE event is not a JSON object: {_snippet(data.encode())!r}")
    error = chunk.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        raise _Failure("stream_error", f"the server sent an error mid-stream: {message}")
    return chunk


def _take_chunk(record: RequestRecord, chunk: dict[str, Any], clock: Clock) -> bool:
    """Note the time of a content chunk, and the usage when the server sends it; True if it ends the answer."""
    now = clock()
    choices = chunk.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    delta = first.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    if content or first.get("text"):
        record.content_seconds.append(now)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            record.usage_output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            record.usage_prompt_tokens = usage["prompt_tokens"]
    return bool(first.get("finish_reason"))


def _error_text(raw: bytes) -> str:
    """The OpenAI error message when the body is one, else a snippet of the body."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return repr(_snippet(raw)) if raw else "an empty body"


def _snippet(raw: bytes) -> str:
    return " ".join(raw.decode("utf-8", "replace").split())[:SNIPPET_CHARS]


async def list_models(client: httpx.AsyncClient, target: Target) -> list[str] | None:
    """The model ids from ``GET /v1/models``, or None when it does not answer with a list."""
    try:
        response = await client.get(target.base_url + "/models")
        data = response.json()["data"]
        return [str(row["id"]) for row in data]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def poisson_arrivals_seconds(rate_per_second: float, count: int, seed: int) -> list[float]:
    """Send times (from 0) of a Poisson process: the first at 0, then exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    times = [0.0]
    while len(times) < count:
        times.append(times[-1] + rng.expovariate(rate_per_second))
    return times[:count]


class LoadGenerator:
    """Runs one step against one target: closed loop (N workers) or open loop (Poisson arrivals)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        target: Target,
        *,
        clock: Clock = time.perf_counter,
        sleep: Sleep = asyncio.sleep,
        timeout_seconds: float,
        ignore_eos: bool = False,
        on_record: OnRecord | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.clock = clock
        self.sleep = sleep
        self.timeout_seconds = timeout_seconds
        self.ignore_eos = ignore_eos
        self.on_record = on_record

    async def one(self, prompt: Prompt) -> RequestRecord:
        record = await stream_request(
            self.client,
            self.target,
            prompt,
            clock=self.clock,
            timeout_seconds=self.timeout_seconds,
            ignore_eos=self.ignore_eos,
        )
        if self.on_record is not None:
            self.on_record(record)
        return record

    async def closed_loop(
        self,
        prompts: Callable[[int], Prompt],
        *,
        concurrency: int,
        max_requests: int | None,
        duration_seconds: float | None,
    ) -> list[RequestRecord]:
        """``concurrency`` workers, each sending its next request when the last one ends, until a limit."""
        limit = math.inf if max_requests is None else max_requests
        records: list[RequestRecord] = []
        started = self.clock()
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < limit and not _past(self.clock() - started, duration_seconds):
                index, sent = sent, sent + 1
                records.append(await self.one(prompts(index)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records

    async def open_loop(
        self,
        prompts: Callable[[int], Prompt],
        *,
        rate_per_second: float,
        max_requests: int | None,
        duration_seconds: float | None,
        seed: int,
        max_concurrency: int | None = None,
    ) -> list[RequestRecord]:
        """Send at Poisson arrival times whatever is in flight; ``max_concurrency`` caps what is in flight."""
        rng = random.Random(seed)
        limit = math.inf if max_requests is None else max_requests
        gate: AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(max_concurrency) if max_concurrency else nullcontext()
        )
        started = self.clock()
        due_seconds = 0.0
        tasks: list[asyncio.Task[RequestRecord]] = []

        async def send(prompt: Prompt) -> RequestRecord:
            async with gate:
                return await self.one(prompt)

        while len(tasks) < limit and not _past(due_seconds, duration_seconds):
            wait_seconds = started + due_seconds - self.clock()
            if wait_seconds > 0:
                await self.sleep(wait_seconds)
            tasks.append(asyncio.create_task(send(prompts(len(tasks)))))
            due_seconds += rng.expovariate(rate_per_second)
        return list(await asyncio.gather(*tasks))


def _past(elapsed_seconds: float, duration_seconds: float | None) -> bool:
    return duration_seconds is not None and elapsed_seconds >= duration_seconds
