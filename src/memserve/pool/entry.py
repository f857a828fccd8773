"""One configured model as the pool keeps it (``Entry``), and the small rules about it that need no pool."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from memserve.config import ModelConfig
from memserve.memory.fit import queue_limit
from memserve.memory.planner import Plan
from memserve.pool.clock import Clock, Timer
from memserve.pool.runner_process import RunnerHandle
from memserve.pool.state import ModelState

_MAX_BACKOFF_SECONDS = 30.0


def backoff_seconds(failures: int) -> float:
    """Wait before starting a model again after ``failures`` failures in a row: 0, 2, 4, 8, ... 30 s."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 1), _MAX_BACKOFF_SECONDS)


def compatible(loaded: Plan, *, context_tokens: int | None, concurrency: int | None) -> bool:
    """Can a runner loaded with the plan ``loaded`` serve what was asked, without loading again?"""
    return (context_tokens is None or loaded.context_tokens >= context_tokens) and (
        concurrency is None or loaded.concurrency >= concurrency
    )


@dataclass
class Entry:
    """One configured model and, when it is loaded, its runner. Mutated only by the pool.

    What its runner holds in memory (reserved and measured bytes) is the ledger's to know, not the entry's.
    """

    config: ModelConfig
    keep_alive_seconds: float
    state: ModelState = ModelState.STOPPED
    runner: RunnerHandle | None = None
    plan: Plan | None = None
    leases: int = 0
    waiting: int = 0
    last_used: float = 0.0
    expires_at: float | None = None  # the pool's clock
    load_seconds: float | None = None
    reason: str | None = None
    failures: int = 0
    load_task: asyncio.Task[None] | None = None
    expiry: Timer | None = None
    watchdog_reason: str | None = None
    ready_at: float | None = None
    skip_rungs: frozenset[str] = frozenset()  # rungs ruled out by repeated kills (a preference); cleared by unload
    rung_kills: dict[str, int] = field(default_factory=dict)  # kills past the plan, per rung; cleared by unload
    pending_options: dict[str, int] | None = None  # context_tokens / concurrency of one /api/load, for its load only
    peak_bytes: dict[str, int] = field(default_factory=dict)  # the current runner's highest use seen, per device
    calibration_key: tuple[str, str] | None = None  # (checkpoint fingerprint, plan key) of the current runner
    learned: bool = False  # the current runner's end taught a bigger reservation (``_learn``)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters on this base, name → source

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_in_flight(self) -> int:
        return self.config.concurrency + queue_limit(self.config.max_queue, self.config.concurrency)

    def schedule_expiry(self, clock: Clock, expire: Callable[[], object]) -> None:
        """Call ``expire`` after ``keep_alive_seconds`` idle on ``clock`` (never for a pinned model or -1)."""
        self.cancel_expiry()
        if self.config.pinned or math.isinf(self.keep_alive_seconds):
            self.expires_at = math.inf
            return
        self.expires_at = clock.now() + self.keep_alive_seconds
        self.expiry = clock.call_later(self.keep_alive_seconds, expire)

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        self.expiry, self.expires_at = None, None

    def row(
        self, reserved_bytes: dict[str, int], measured_bytes: dict[str, int], expires_at: float | None
    ) -> dict[str, Any]:
        """The /api/ps row, given what the ledger holds for it and when it expires (wall-clock seconds)."""
        runner, loaded = self.runner, self.plan
        devices = {
            d: {"reserved_bytes": reserved_bytes.get(d, 0), "measured_bytes": measured_bytes.get(d, 0)}
            for d in sorted({*reserved_bytes, *measured_bytes})
        }
        return {
            "name": self.name,
            "state": self.state,
            "pid": runner.pid if runner else None,
            "source": self.config.source,
            "adapters": sorted(self.adapters),
            "rung": loaded.rung if loaded else None,
            "dtype": loaded.dtype if loaded else None,
            "quantization": loaded.quantization if loaded else None,
            "context_tokens": loaded.context_tokens if loaded else None,
            "concurrency": loaded.concurrency if loaded else None,
            "devices": devices,
            "leases": self.leases,
            "queued": self.waiting,
            "pinned": self.config.pinned,
            "keep_alive_seconds": None if math.isinf(self.keep_alive_seconds) else self.keep_alive_seconds,
            "expires_at": expires_at,
            "load_seconds": self.load_seconds,
            "reason": self.reason,
            "runner": loaded.runner if loaded else None,
            "socket": str(getattr(runner, "socket_path", "") or getattr(runner, "address", "")) or None,
        }


def raise_peak(peaks: dict[str, int], seen: Mapping[str, int]) -> None:
    """Raise each device's highest use in ``peaks`` to what was ``seen``."""
    for device, value in seen.items():
        peaks[device] = max(peaks.get(device, 0), value)


def keep_alive(seconds: float | None, default: float) -> float:
    """Seconds to keep an idle model: ``seconds`` (the request's or the model's) else ``default``; < 0 is forever."""
    value = default if seconds is None else seconds
    return math.inf if value < 0 or math.isinf(value) else float(value)


class Lease:
    """A hold on a ready runner for one request. ``release`` is idempotent; the pool never evicts it meanwhile."""

    def __init__(self, entry: Entry, runner: RunnerHandle, release: Callable[[Entry], None]) -> None:
        """``release``: the pool's, called once with ``entry`` when the request ends."""
        self.name = entry.name
        self.client: httpx.AsyncClient = runner.client
        self.transport: httpx.AsyncBaseTransport = runner.transport
        self._entry, self._release, self._released = entry, release, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self._entry)


__all__ = ["Entry", "Lease", "backoff_seconds", "compatible", "keep_alive", "raise_peak"]
