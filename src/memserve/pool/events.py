"""What the pool did, as records: kept for ``GET /api/events``, logged for a person, read back by the CLI.

Each :class:`PoolEvent` has a kind (:class:`PoolEventKind`), the model it is about, and the fields of that
kind (``reason``, ``rung``, ``reserved_bytes`` ...). Its JSON is flat: ``{"seq", "time", "event", "model",
**fields}``; :meth:`PoolEvent.from_json` reads it back, so the gateway writes and the CLI reads one shape.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from memserve.logs import FIELDS
from memserve.units import format_bytes

log = logging.getLogger("memserve.pool")


class PoolEventKind(StrEnum):
    """The kinds of pool event, named once."""

    LOAD = "load"  # a runner is started: rung, reserved_bytes
    PHASE = "phase"  # its load finished a phase: phase, seconds
    READY = "ready"  # pid, load_seconds, measured_bytes
    RESERVE = "reserve"  # its warm-up peaked above the reservation, which is raised to it: reserved_bytes, reason
    EVICT = "evict"  # stopped to make room for another model: reason
    STOPPED = "stopped"  # reason
    CRASH = "crash"  # a ready runner exited on its own: pid, reason
    WATCHDOG_KILL = "watchdog_kill"  # pid, reason, measured_bytes and limit_bytes, or available_bytes
    LEARNED = "learned"  # a kill or crash taught a bigger reservation: rung, measured_bytes, next_reserved_bytes
    # loading again on a rung: rung, reserved_bytes, reason; after a kill also measured_bytes, failed_reserved_bytes
    RETRY = "retry"
    # one rung lower than failed_rung: reason, measured_bytes, failed_reserved_bytes; rung and reserved_bytes
    # when a lower rung fits
    RETRY_LOWER = "retry_lower"
    RUNG_LOWER = "rung_lower"  # planned one rung lower, the measured figure does not fit: failed_rung, rung, reason
    RESERVATION_CAPPED = "reservation_capped"  # loaded with all that is usable: rung, reserved_bytes, reason
    BACKOFF = "backoff"  # waits before loading again after failures: seconds
    REFUSED = "refused"  # the load was refused (no fit, busy, bad options): reason, code
    LOAD_FAILED = "load_failed"  # reason
    CLEARED = "cleared"  # a failed model cleared by unload: reason
    RELOAD = "reload"  # the loaded plan cannot serve what a load asks: reason
    ADAPTER = "adapter"  # a LoRA adapter added to or removed from the model: adapter, action, weights_bytes


@dataclass(frozen=True)
class PoolEvent:
    """One thing the pool did to one model. ``time`` is wall-clock seconds since the epoch (for people)."""

    seq: int
    time: float
    kind: PoolEventKind | str  # a str only for a kind this version does not know (a newer server's)
    model: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "event": str(self.kind), "model": self.model, **self.fields}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PoolEvent:
        """The record of ``to_json``'s shape; ValueError when ``seq``, ``event`` or ``model`` is missing."""
        seq, kind, model, time = data.get("seq"), data.get("event"), data.get("model"), data.get("time", 0.0)
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(kind, str) or not isinstance(model, str):
            raise ValueError(f"a pool event has an integer seq, an event name and a model, got {dict(data)!r}")
        known = kind in PoolEventKind._value2member_map_
        return cls(
            seq,
            float(time) if isinstance(time, int | float) else 0.0,
            PoolEventKind(kind) if known else kind,
            model,
            {k: v for k, v in data.items() if k not in ("seq", "time", "event", "model")},
        )

    def line(self) -> str:
        """``kind model key=value ...`` for the log: sizes in units, seconds in s, the reason last."""
        details = render(self.fields)
        return f"{self.kind} {self.model}{f' {details}' if details else ''}"


class EventLog:
    """The pool's last ``kept`` events, numbered from 1 in order, each logged as one line when added."""

    def __init__(self, wall: Callable[[], float], kept: int = 1000) -> None:
        """``wall``: the pool clock's wall-clock time, stamped on each event."""
        self._wall, self._seq = wall, 0
        self._kept: collections.deque[PoolEvent] = collections.deque(maxlen=kept)
        self._listeners: list[Callable[[PoolEvent], None]] = []

    def subscribe(self, listener: Callable[[PoolEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with every event added from now on (on the pool's loop, synchronously: it must
        not block and should not raise); returns the function that unsubscribes it. Metrics count events
        and the live page pushes them this way, so neither polls the log nor misses what it scrolled off."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def add(self, kind: PoolEventKind, model: str, fields: dict[str, Any]) -> PoolEvent:
        self._seq += 1
        event = PoolEvent(self._seq, self._wall(), kind, model, fields)
        self._kept.append(event)
        log.info("%s", event.line(), extra={FIELDS: event.to_json()})
        for listener in list(self._listeners):  # a listener may unsubscribe itself
            try:
                listener(event)
            except Exception:  # a listener's bug never stops the pool: it is logged, and the others still hear
                log.exception("a pool event listener failed on %s", event.line())
        return event

    def __iter__(self) -> Iterator[PoolEvent]:
        return iter(self._kept)

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        """The JSON of the events after sequence number ``seq``, oldest first (``GET /api/events``)."""
        return [e.to_json() for e in self._kept if e.seq > seq]


def sizes(per_device: Mapping[str, int]) -> str:
    """``1.0 GiB on cpu, 2.0 GiB on cuda:0``; ``nothing`` for none."""
    return ", ".join(f"{format_bytes(v)} on {d}" for d, v in sorted(per_device.items())) or "nothing"


def render(fields: Mapping[str, Any]) -> str:
    """An event's fields for the log, for a person: ``key=value``, sizes in units, seconds in s, the reason last."""
    parts = []
    for key, value in sorted(fields.items(), key=lambda item: item[0] == "reason"):
        if value is None:
            continue
        if key.endswith("_bytes") and isinstance(value, Mapping):
            text = sizes(value)
        elif key.endswith("_bytes") and isinstance(value, int | float) and not isinstance(value, bool):
            text = format_bytes(value)
        elif key.endswith("_seconds") or key == "seconds":
            text = f"{value:g}s" if isinstance(value, int | float) else str(value)
        else:
            text = str(value)
        name = key.removesuffix("_bytes").removesuffix("_seconds")
        parts.append(f'{name}="{text}"' if " " in text or not text else f"{name}={text}")
    return " ".join(parts)


__all__ = ["EventLog", "PoolEvent", "PoolEventKind", "render", "sizes"]
