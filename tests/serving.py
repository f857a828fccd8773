"""Serve any ASGI app with a real uvicorn in a thread, for tests that need real sockets; the fake OpenAI server."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.types import ASGIApp

from memserve.wire.fake import UDS_ORIGIN, FakeOpenAI, ReceivedRequest, Script, serve_in_thread
from memserve.wire.fake import serve_fake as _serve_fake

__all__ = ["UDS_ORIGIN", "FakeOpenAI", "ReceivedRequest", "Script", "nothing_listening", "serve_app", "serve_fake"]


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
