"""Exact time for load-generator tests: a virtual clock that jumps when everything waits.

``VirtualClock`` is the load generator's ``clock`` and ``sleep`` and the fake server's ``sleep``. Time
stands still while any task can run; once every task waits, ``run`` jumps to the earliest wake-up (as
trio's ``MockClock(autojump_threshold=0)`` does). So a server scripted "first token at 0.0625, then
every 0.015625" is seen by the client at exactly those times.

The fake server is reached in-process through ``tests.serving.StreamingASGITransport``, which hands each body
message to the client as it is sent.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

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
