"""Run one call on a short-lived daemon thread and hand back its result or its exception.

The runner needs this in two places, for two reasons:

- **Loading** (``runner/serve.py``) runs torch ops (reading every weight, the warm-up forwards). libgomp
  gives each thread that runs parallel ops its own team of OpenMP workers; a team made by the main thread
  stays beside the generation thread's for the life of the process, and every step then runs ~25% slower
  on 2 cores (demo-small: 22 → 28 ms per forward, 50 → 37 tok/s, transformers 5.23, torch 2.13). A
  worker thread's team goes back to libgomp when the thread ends, and the generation thread reuses it.
- **Starting continuous batching** (``runner/batching.py``): threads inherit daemon-ness from the thread
  that creates them, and the library's generation thread (non-daemon by default) would otherwise hold the
  process open at exit until someone stops it.

The thread is a daemon so that Ctrl-C while loading exits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_fresh_thread(work: Callable[[], T], *, name: str) -> T:
    """``work()`` on a new daemon thread named ``name``; its result, or its exception re-raised here."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed back to the caller below
            errors.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]
