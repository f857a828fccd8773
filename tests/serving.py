"""Serve any ASGI app with a real uvicorn in a thread, for tests that need real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

UDS_ORIGIN = "http://fake-upstream"
"""The origin in a base URL for a server on a Unix socket (the host is not used for routing)."""


@contextmanager
def serve_app(app: ASGIApp, *, uds: Path | None = None, lifespan: bool = False) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread, on a free 127.0.0.1 port or a Unix socket; yield its origin.

    A socket's origin is ``UDS_ORIGIN``: reach it with ``httpx.HTTPTransport(uds=...)``.
    """
    sock: socket.socket | None = None
    common: dict[str, Any] = {"log_config": None, "log_level": "warning", "access_log": False, "http": "h11",
                              "ws": "none", "lifespan": "on" if lifespan else "off", "timeout_graceful_shutdown": 3}
    if uds is not None:
        config = uvicorn.Config(app, uds=str(uds), **common)
        origin = UDS_ORIGIN
    else:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it Nagle and delayed
        # ACKs add ~40 ms to every answer uvicorn writes in two parts (headers, then body)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, **common)
        origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": None if sock is None else [sock]},
                              daemon=True, name=f"uvicorn {origin}")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield origin
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if sock is not None:
            sock.close()
