"""Exact time for load-generator tests: a virtual clock that jumps when everything waits, and a streaming
in-process ASGI transport.

``VirtualClock`` is the load generator's ``clock`` and ``sleep`` and the fake server's ``sleep``. Time
stands still while any task can run; once every task waits, ``run`` jumps to the earliest wake-up (as
trio's ``MockClock(autojump_threshold=0)`` does). So a server scripted "first token at 0.0625, then
every 0.015625" is seen by the client at exactly those times.

httpx's own ``ASGITransport`` collects the whole body before it returns a response, so every chunk
would arrive at the end. ``StreamingASGITransport`` hands each body message to the client as it is sent.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class VirtualClock:
    def __init__(self) -> None:
        self.now_seconds = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now_seconds

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now_seconds + seconds, next(self._order), future))
        await future

    async def _jump_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0)
            # the loop's queue of ready callbacks (private, but stable since asyncio began): empty means every
            # other task is waiting, on a virtual sleep or on something only a virtual sleep can unblock
            if loop._ready or not self._sleepers:  # type: ignore[attr-defined]
                continue
            wake_seconds, _, future = heapq.heappop(self._sleepers)
            self.now_seconds = wake_seconds
            if not future.done():
                future.set_result(None)

    def run(self, main: Callable[[], Awaitable[T]], *, real_limit_seconds: float = 20.0) -> T:
        """``asyncio.run(main())`` with the clock jumping ahead whenever all tasks wait.

        A bug that never stops (a step that ignores its limits) fails after ``real_limit_seconds`` of real time
        instead of hanging the test run.
        """

        async def driven() -> T:
            jumper = asyncio.create_task(self._jump_when_idle())
            try:
                return await asyncio.wait_for(main(), real_limit_seconds)
            finally:
                jumper.cancel()

        return asyncio.run(driven())


class _Body(httpx.AsyncByteStream):
    def __init__(self, queue: asyncio.Queue[dict[str, Any]], app_task: asyncio.Task[None], gone: asyncio.Event) -> None:
        self.queue, self.app_task, self.gone = queue, app_task, gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await _next_message(self.queue, self.app_task)
            if message is None:
                return
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    async def aclose(self) -> None:
        self.gone.set()
        self.app_task.cancel()


async def _next_message(queue: asyncio.Queue[dict[str, Any]], app_task: asyncio.Task[None]) -> dict[str, Any] | None:
    """The next ASGI message, or None when the app ended without sending one."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, app_task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    app_task.result()  # re-raises what the app raised
    return None


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Calls an ASGI app in-process and streams its body messages to the client one by one."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        gone = asyncio.Event()
        sent_request = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if gone.is_set():
                raise OSError("the client went away")
            await queue.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path,
            "query_string": request.url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1234),
        }
        app_task = asyncio.ensure_future(self.app(scope, receive, send))
        start = await _next_message(queue, app_task)
        if start is None:
            raise httpx.RemoteProtocolError("the app ended without a response")
        return httpx.Response(
            start["status"], headers=start.get("headers", []), stream=_Body(queue, app_task, gone), request=request
        )
