"""Dynamic batching for encoders: concurrent requests' inputs share forwards, bounded by a token budget.

As TEI does: every input waits in one queue; one worker thread owns the model and, each time it is free,
takes the waiting inputs in arrival order while the padded batch (rows × its longest input) stays within
``max_batch_tokens``, runs one forward over them, and hands each input its row. There is no timer: while a
forward runs, the inputs that arrive meanwhile gather, and the next forward takes them all, so batches
grow with the load by themselves and a lone request waits for nothing.

The padded size is what is bounded because it is what a padded forward costs in memory (the plan prices
activations by it: ``memory/encoders.py``). An input longer than the budget (never, with a plan whose budget
is at least the model's input limit) runs alone.

The event loop and the worker meet at a lock-guarded deque; results come back through
``loop.call_soon_threadsafe``. Work that changes the model (adding or removing a LoRA adapter) runs on the
worker too, between two forwards (``on_worker``). An input whose request went away (its future cancelled) is
skipped, not run.
Torch-free: the forward is a function given to it (``runner/encoder.py``), so tests drive it with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from memserve.errors import GenerationFailed, InvalidArgument
from memserve.wire.events import EngineStats, QueueFull

__all__ = ["EncoderBatcher", "Forward", "padded_tokens"]

Forward = Callable[[list[list[int]], list[str | None]], Sequence[Any]]
"""(token-id rows, the adapter of each row or None for the base) → one result per row, in order."""

STOP_TIMEOUT_SECONDS = 30.0
T = TypeVar("T")


def padded_tokens(lengths: Sequence[int]) -> int:
    """What a padded batch of these inputs holds: rows × the longest."""
    return len(lengths) * max(lengths, default=0)


@dataclass(eq=False)
class _Item:
    ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class EncoderBatcher:
    """The encoder's engine: a queue of inputs, one worker thread, one forward per batch."""

    name = "encoder"

    def __init__(self, forward: Forward, *, max_batch_tokens: int, max_requests: int) -> None:
        if max_batch_tokens < 1 or max_requests < 1:
            raise InvalidArgument(
                f"max_batch_tokens and max_requests must be at least 1, got {max_batch_tokens} and {max_requests}"
            )
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_requests = max_requests
        self._pending: deque[_Item] = deque()
        self._control: deque[Callable[[], None]] = deque()  # work for the model's thread, before the next batch
        self._wake = threading.Condition()
        self._closed = False
        self._requests = 0  # admitted and not yet answered: touched on the event loop only
        self._running = 0
        self._totals = {"requests": 0, "inputs": 0, "tokens": 0, "batches": 0, "padded_tokens": 0}
        self._largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="memserve-encoder", daemon=True)
        self._thread.start()

    async def run(self, inputs: Sequence[list[int]], adapter: str | None = None) -> list[Any]:
        """Each input's result, in order. ``QueueFull`` (before anything is queued) when ``max_requests``
        requests are already admitted; ``GenerationFailed`` when the forward failed or the engine closed."""
        if self._closed:
            raise GenerationFailed("the encoder is shutting down; retry on another runner")
        if self._requests >= self.max_requests:
            raise QueueFull(self._requests, len(self._pending))
        loop = asyncio.get_running_loop()
        items = [_Item(list(ids), adapter, loop, loop.create_future()) for ids in inputs]
        self._requests += 1
        self._totals["requests"] += 1
        self._totals["inputs"] += len(items)
        self._totals["tokens"] += sum(len(i.ids) for i in items)
        try:
            with self._wake:
                self._pending.extend(items)
                self._wake.notify()
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            self._requests -= 1
            for item in items:  # a request that went away: its inputs are skipped, not run
                item.future.cancel()

    async def on_worker(self, work: Callable[[], T]) -> T:
        """``work()`` on the worker thread between two forwards (what changes the model, as adding an adapter
        does, must not run beside a forward); its result, or its exception raised here."""
        if self._closed:
            raise GenerationFailed("the encoder is shutting down; retry on another runner")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                outcome: Any = work()
            except Exception as exc:  # handed to the caller, as a forward's failure is to its requests
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it
                loop.call_soon_threadsafe(_deliver, future, outcome)

        with self._wake:
            self._control.append(run)
            self._wake.notify()
        return await future

    def _take(self) -> list[_Item] | Callable[[], None]:
        """The next batch, in arrival order, within the budget, or work for this thread (first); waits for
        either. Empty: closed."""
        with self._wake:
            while True:
                while self._pending and self._pending[0].future.done():
                    self._pending.popleft()  # cancelled while waiting
                if self._control:
                    return self._control.popleft()
                if self._pending or self._closed:
                    break
                self._wake.wait()
            batch: list[_Item] = []
            longest = 0
            while self._pending:
                item = self._pending[0]
                if item.future.done():
                    self._pending.popleft()
                    continue
                wider = max(longest, len(item.ids))
                if batch and (len(batch) + 1) * wider > self.max_batch_tokens:
                    break
                batch.append(self._pending.popleft())
                longest = wider
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if callable(batch):
                batch()
                continue
            if not batch:
                return
            self._running = len(batch)
            try:
                results: Sequence[Any] = self.forward([i.ids for i in batch], [i.adapter for i in batch])
                error: BaseException | None = None
            except Exception as exc:  # answered to each request as a 500; the worker goes on serving
                results, error = [], exc
            finally:
                self._running = 0
            self._totals["batches"] += 1
            self._totals["padded_tokens"] += padded_tokens([len(i.ids) for i in batch])
            self._largest_batch = max(self._largest_batch, len(batch))
            for index, item in enumerate(batch):
                outcome = results[index] if error is None else _failure(error)
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it
                    item.loop.call_soon_threadsafe(_deliver, item.future, outcome)

    def warm_up(self, inputs: list[list[int]]) -> None:
        """Run one forward over ``inputs`` on the calling thread, before serving (the worst-case warm-up)."""
        self.forward(inputs, [None] * len(inputs))

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._running,
            waiting=len(self._pending),
            prompt_tokens_total=self._totals["tokens"],
            requests_total=self._totals["requests"],
            extra={
                "inputs_total": self._totals["inputs"],
                "batches_total": self._totals["batches"],
                "padded_tokens_total": self._totals["padded_tokens"],
                "largest_batch_inputs": self._largest_batch,
                "max_batch_tokens": self.max_batch_tokens,
            },
        )

    async def close(self) -> None:
        """Stop the worker after its current forward; inputs still waiting fail with GenerationFailed."""
        with self._wake:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            self._wake.notify_all()
        for item in waiting:
            _deliver(item.future, GenerationFailed("the encoder shut down before this input ran; retry"))
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT_SECONDS)


def _failure(error: BaseException) -> GenerationFailed:
    failure = GenerationFailed(f"the encoder's forward failed: {type(error).__name__}: {error}")
    failure.__cause__ = error
    return failure


def _deliver(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
