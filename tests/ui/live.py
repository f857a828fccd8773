"""A real gateway for the ``/ui`` tests, with a handle on its event loop: the tests add pool events on it and
count its tasks from the test's thread."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from memserve.config import Settings
from memserve.gateway.app import create_app
from memserve.memory.inventory import Inventory
from memserve.pool.events import PoolEventKind
from memserve.pool.pool import ModelPool
from tests.gateway.test_gateway_process import runner_pids
from tests.serving import serve_app

T = TypeVar("T")


class LoopSpy:
    """ASGI: remembers the loop the server runs ``app`` on, so a test can run code there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@dataclass
class Live:
    """A gateway served in this process: its origin, pool and app, and its loop (once it has served a request)."""

    origin: str
    pool: ModelPool
    app: ASGIApp
    spy: LoopSpy

    def on_loop(self, function: Callable[[], T]) -> T:
        """``function()`` run on the server's loop (where the pool lives), its result returned here."""
        assert self.spy.loop is not None, "the server has not served a request yet"

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.spy.loop).result(timeout=30)

    def add_event(self, kind: PoolEventKind, model: str, **fields: Any) -> int:
        """Add a pool event as the pool would (on its loop); its sequence number."""
        return self.on_loop(lambda: self.pool.history.add(kind, model, fields).seq)

    def tasks(self) -> int:
        """The tasks on the server's loop, this count's own left out."""
        return self.on_loop(lambda: len(asyncio.all_tasks())) - 1

    def listeners(self) -> int:
        """The listeners on the pool's event log that the open streams subscribed (one each); the pool's own
        counters, subscribed for its whole life, are not counted."""
        counters = self.pool.counters
        return self.on_loop(
            lambda: sum(
                getattr(listener, "__self__", None) is not counters for listener in self.pool.history._listeners
            )
        )


@contextmanager
def live_gateway(settings: Settings, inventory: Inventory) -> Iterator[Live]:
    """``create_app`` over a real pool, served with its lifespan on a free port; no runner is left behind."""
    pool = ModelPool(settings, inventory)
    app = create_app(settings, pool)
    spy = LoopSpy(app)
    with serve_app(spy, lifespan=True) as origin:
        httpx.get(f"{origin}/health", timeout=30).raise_for_status()  # the spy has the loop from here on
        yield Live(origin, pool, app, spy)
    assert not runner_pids(), "the gateway left runner processes behind"


def read_frames(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """The next ``count`` SSE frames from ``lines`` (``Response.iter_lines()``): ``{"event", "id", "data"}`` for an
    event (data parsed as JSON), ``{"comment": text}`` for a comment line."""
    frames: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    for line in lines:
        if line.startswith(":"):
            frames.append({"comment": line[1:].strip()})
        elif line:
            field, _, value = line.partition(":")
            frame[field] = json.loads(value) if field == "data" else value.strip()
            continue
        elif frame:
            frames.append(frame)
            frame = {}
        if len(frames) == count:
            return frames
    raise AssertionError(f"the stream ended after {len(frames)} of {count} frames: {frames}")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition()`` to hold (a hang guard of 30 s, not a speed check)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)
