"""An asyncio event loop whose clock is virtual: time jumps to the next timer whenever nothing can run.

Pool tests run on it so that keep-alives, backoffs, watchdog intervals and deadlines pass without real
waiting (the pool's ``LoopClock`` reads this loop's time). Only real events hold it: while a thread the loop
started (``asyncio.to_thread``) is working, or I/O is awaited with no timer pending, the loop waits for
real, and virtual time stands still, so a timer can never fire "early" just because a thread was slow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
TICK_SECONDS = 1e-6
"""What each pass of the loop costs in virtual time. Real time always moves on, and code relies on it: a
deadline a few ulps away would otherwise be reached by no number of passes (``remaining`` stays > 0 while
a timer for it is already due)."""


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls the real selector; where the loop would sleep until its next timer, moves virtual time there."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.loop.advance(TICK_SECONDS)
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.loop.threads_working:
            return super().select(timeout)  # a real event must come: a thread's result, or I/O
        self.loop.advance(max(0.0, timeout - TICK_SECONDS))
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``time()`` starts at 0 and moves only when the loop would otherwise wait for its next timer."""

    def __init__(self) -> None:
        selector = _Selector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0
        self.threads_working = 0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def run_in_executor(
        self, executor: concurrent.futures.Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        self.threads_working += 1
        future = super().run_in_executor(executor, func, *args)
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self.threads_working -= 1


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
