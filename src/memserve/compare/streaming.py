"""An httpx transport that sends each completion request streamed and answers with the whole body, timed.

The batch executor sends plain (non-streamed) requests and records the body it gets back. Streaming is
the only way to see the time to the first token per request: the gateway's ``/metrics`` has only
histogram buckets per model, and its usage rows carry a TTFT only for streamed requests. So this
transport asks for a stream (with ``include_usage``), reads it, and hands the executor the body a plain
request would have got, with ``memserve_timing`` added: ``ttft_seconds``, ``e2e_seconds`` and the wall
clock ``started_at``/``finished_at``. The timings are therefore in the output file, the checkpoint, and
survive a resume. An error in the stream, or a stream that ends before its last event (a runner killed),
is answered as a 502 so the executor retries it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

TIMING_FIELD = "memserve_timing"


class StreamingTimer(httpx.AsyncBaseTransport):
    """Wraps ``inner``: POSTs to ``…/completions`` go streamed and come back whole with their timings."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.clock = clock
        self.wall = wall

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("completions"):
            return await self.inner.handle_async_request(request)
        body = json.loads(await request.aread())
        chat = request.url.path.endswith("chat/completions")
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
        streamed = httpx.Request(
            "POST", request.url, headers=headers, content=json.dumps(body).encode(), extensions=request.extensions
        )
        started_at, started = self.wall(), self.clock()
        response = await self.inner.handle_async_request(streamed)
        try:
            if response.status_code != 200:
                content = await response.aread()
                kept = {
                    k: v
                    for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
                }
                return httpx.Response(response.status_code, headers=kept, content=content, request=request)
            whole = await _assemble(response, chat=chat, clock=self.clock, started=started)
        finally:
            await response.aclose()
        if "error" in whole:
            return httpx.Response(502, json=whole, request=request)
        whole[TIMING_FIELD] = {
            "ttft_seconds": whole.pop("_ttft", None),
            "e2e_seconds": self.clock() - started,
            "started_at": started_at,
            "finished_at": self.wall(),
        }
        request_id = response.headers.get("x-request-id") or str(whole.get("id", ""))
        return httpx.Response(200, json=whole, headers={"x-request-id": request_id}, request=request)


async def _assemble(
    response: httpx.Response, *, chat: bool, clock: Callable[[], float], started: float
) -> dict[str, Any]:
    """The non-streamed body from the stream's events (an ``{"error": …}`` object if the stream failed)."""
    text: list[str] = []
    first: float | None = None
    finish: str | None = None
    usage: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    done = False
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                return {"error": event["error"]}
            meta = meta or {k: event.get(k) for k in ("id", "created", "model")}
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    if first is None:
                        first = clock() - started
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    if not done or finish is None:
        return {
            "error": {"message": "the stream ended before its last event", "type": "api_error", "code": "stream_cut"}
        }
    content = "".join(text)
    choice_out: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        if chat
        else {"index": 0, "text": content, "finish_reason": finish}
    )
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": [choice_out],
        "usage": usage,
        "_ttft": first if first is not None else clock() - started,
    }


__all__ = ["TIMING_FIELD", "StreamingTimer"]
