"""What tests use to serve and reach things: an ASGI app on real sockets (uvicorn in a thread) or in-process
(``StreamingASGITransport``), the fake OpenAI server, a free port (``memserve.net``'s, which benchmarks use
too), a real runner process on a demo model. Each is said once here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp

from memserve.engines.fit import fit_json, fit_result
from memserve.memory.probe import probe_inventory
from memserve.net import free_port
from memserve.wire.fake import UDS_ORIGIN, FakeOpenAI, ReceivedRequest, Script, serve_in_thread
from memserve.wire.fake import serve_fake as _serve_fake

__all__ = [
    "UDS_ORIGIN",
    "FakeOpenAI",
    "ReceivedRequest",
    "Script",
    "StreamingASGITransport",
    "free_port",
    "nothing_listening",
    "runner_process",
    "serve_app",
    "serve_fake",
    "wait_until_healthy",
]


@contextmanager
def serve_app(app: ASGIApp, *, uds: Path | None = None, lifespan: bool = False) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread, on a free 127.0.0.1 port or a Unix socket; yield its origin.

    HTTP/1.1 through h11, as the tests have always served. A socket's origin is ``UDS_ORIGIN``: reach it with
    ``httpx.HTTPTransport(uds=...)``.
    """
    with serve_in_thread(app, uds=uds, lifespan=lifespan, http="h11") as origin:
        yield origin


@contextmanager
def serve_fake(fake: FakeOpenAI | None = None, *, uds: Path | None = None) -> Iterator[FakeOpenAI]:
    """Serve a fake OpenAI server (``memserve.wire.fake``) as ``serve_app`` serves apps; its ``base_url`` (with
    /v1) and ``uds`` are set while it runs."""
    with _serve_fake(fake, uds=uds, http="h11") as served:
        yield served


@contextmanager
def nothing_listening() -> Iterator[str]:
    """A base URL on 127.0.0.1 whose port is held but not listening, so connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def wait_until_healthy(origin: str, process: subprocess.Popen[bytes], *, log: Path | None = None) -> None:
    """Wait (up to 60 s) for a ``memserve serve`` process to answer ``GET /health``; fail with its log if it exits."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{origin}/health", timeout=2).status_code == 200:
                return
        alive = process.poll() is None and time.monotonic() < deadline
        assert alive, f"the gateway did not start: {log.read_text()[-2000:] if log else ''}"
        time.sleep(0.1)


@contextmanager
def runner_process(
    model_dir: Path,
    folder: Path,
    *,
    name: str,
    context: int,
    concurrency: int,
    quantization: str = "auto",
    env: dict[str, str] | None = None,
    adapters: tuple[Path, ...] = (),
    max_queue: int | None = None,
) -> Iterator[str]:
    """A real runner (``python -m memserve.runner``) on ``model_dir``, planned as ``fit --json`` plans it for a
    4 GiB CPU budget and served on a free port as ``name``; yield its base URL (no /v1). Its stderr (the load
    phases as JSON lines) is ``folder / "runner.log"``, its plan ``folder / "plan.json"``; it is stopped on the
    way out. ``adapters`` are LoRA folders planned as ``fit --adapter`` plans them and loaded at start, each
    named by its folder. ``max_queue`` is the runner's ``--max-queue`` (the pool passes a model's own)."""
    inventory = probe_inventory(memory="cpu=4GiB")
    facts, request, result = fit_result(
        str(model_dir),
        context=context,
        concurrency=concurrency,
        quantization=quantization,
        adapters=tuple(str(a) for a in adapters),
        inventory=inventory,
    )
    assert result.plan is not None, result
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps(fit_json(facts, request, result, inventory)))
    port = free_port()
    log = folder / "runner.log"
    command = [sys.executable, "-m", "memserve.runner", "--plan", str(plan_file), "--port", str(port), "--name", name]
    if max_queue is not None:
        command += ["--max-queue", str(max_queue)]
    with log.open("w") as err:
        process = subprocess.Popen(
            command, stderr=err, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"runner exited with {process.returncode}: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"runner not ready in 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Calls an ASGI app in-process and hands each body message to the client as the app sends it.

    httpx's own ``ASGITransport`` joins the whole body before it returns a response, so a stream would arrive
    as one chunk at the end. Closing the response (the client hanging up) is the app's ``http.disconnect``.
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
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


class _Body(httpx.AsyncByteStream):
    def __init__(
        self, queue: asyncio.Queue[dict[str, Any]], app_task: asyncio.Future[None], gone: asyncio.Event
    ) -> None:
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


async def _next_message(queue: asyncio.Queue[dict[str, Any]], app_task: asyncio.Future[None]) -> dict[str, Any] | None:
    """The next ASGI message, or None when the app ended without sending one."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, app_task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    app_task.result()  # re-raises what the app raised
    return None
