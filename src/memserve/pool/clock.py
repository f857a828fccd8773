"""All of the pool's timing in one seam: what time it is, sleeping, timers.

The pool never calls ``time``, ``asyncio.sleep`` or ``loop.call_later`` itself; it asks its :class:`Clock`.
:class:`LoopClock`, the default, is the running event loop's clock, so a test that runs the pool on an event
loop with virtual time (``tests/pool/virtual_time.py``) runs every keep-alive, backoff, watchdog interval and
deadline without waiting for any of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The pool's time."""

    def now(self) -> float:
        """Monotonic seconds: deadlines, idle times, load durations."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for what people read (event times, when a model expires)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer: ...


class LoopClock:
    """The running event loop's clock (``loop.time()``), and ``time.time()`` for the wall clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


async def wait_event(clock: Clock, event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds of ``clock`` (None: no limit); whether it is set."""
    if timeout is None or event.is_set():
        await event.wait()
        return True
    waiter = asyncio.ensure_future(event.wait())
    expired = asyncio.get_running_loop().create_future()

    def expire() -> None:
        if not expired.done():
            expired.set_result(None)

    timer = clock.call_later(max(0.0, timeout), expire)
    try:
        await asyncio.wait({waiter, expired}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        waiter.cancel()
        expired.cancel()
    return event.is_set()


__all__ = ["Clock", "LoopClock", "Timer", "wait_event"]
