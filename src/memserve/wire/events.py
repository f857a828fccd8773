"""Records that flow out of a runner: HTTP, CLI, metrics and usage all read the same ones.

Two kinds. An engine yields :class:`TokenEvent` records to the runner's HTTP layer. The runner process
reports its start-up to the gateway as one JSON line per event on stderr (``phase``, ``ready``,
``listening``, ``failed``, ``engine_fallback``, ``test_balloon``), and then its engine's figures (``stats``,
for ``/metrics``): :data:`RunnerEvent`, each record with one
``to_json``/``from_json`` pair, written by the runner and read by the pool (``pool/runner_process.py``).
This module is torch-free (the gateway imports it) and imports nothing from the rest of the runner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from memserve.wire.schema import FinishReason


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Token ids in, token ids out; text is the HTTP layer's business."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # eos and friends: generation ends *after* emitting one
    adapter: str | None = None  # a LoRA adapter loaded on the base (runner/lora.py); None: the base alone


class AdapterSpec(BaseModel):
    """One LoRA adapter on a base: the body of the runner's ``POST /adapters``, and each entry of a plan file's
    ``model.adapters``. ``source`` is a folder PEFT's ``save_pretrained`` wrote."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^:/\s]+$")
    source: str = Field(min_length=1)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; the last event of a sequence carries ``finish_reason``."""

    request_id: str
    token_id: int
    index: int  # 0-based position in the completion
    finish_reason: FinishReason | None = None
    # seconds since the request was accepted by the engine (TTFT is the first event's value)
    elapsed_seconds: float = 0.0


@dataclass
class EngineStats:
    """What ``GET /stats`` reports."""

    running: int = 0
    waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class QueueFull(Exception):
    """The engine holds its maximum of running and waiting sequences; the caller should retry later."""

    def __init__(self, running: int, waiting: int, retry_after_seconds: float = 1.0) -> None:
        super().__init__(f"{running} sequences running and {waiting} waiting, the most this plan allows")
        self.running = running
        self.waiting = waiting
        self.retry_after_seconds = retry_after_seconds


class Engine(Protocol):
    """A generation engine owning one loaded model.

    ``generate`` yields TokenEvents as they are produced. Closing the iterator early (the client went
    away) must free the sequence at once. ``generate`` raises QueueFull *before* yielding anything
    when the bounded queue is full.
    """

    name: str  # "continuous-batching" or "generate"

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ start-up

Memory = dict[str, dict[str, int]]
"""A runner's memory per device, as ``runner/load.py: process_memory`` measures it: cpu has ``rss_bytes``,
``anon_bytes``, ``file_bytes``, ``peak_rss_bytes``; a GPU ``allocated_bytes``, ``reserved_bytes``,
``peak_reserved_bytes``."""


def _sizes(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or any(isinstance(v, bool) or not isinstance(v, int) for v in value.values()):
        raise ValueError(f"{what} must map devices to byte counts, got {value!r}")
    return {str(d): int(v) for d, v in value.items()}


def _memory(value: Any) -> Memory:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"memory must map devices to their figures, got {value!r}")
    return {str(d): _sizes(figures, f"memory of {d}") for d, figures in value.items()}


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be text, got {value!r}")
    return value


def peak_bytes(memory: Memory) -> dict[str, int]:
    """The runner's own peak per device in a memory report: peak RSS on cpu, peak reserved on a GPU."""
    peaks: dict[str, int] = {}
    for device, figures in memory.items():
        value = figures.get("peak_rss_bytes") or figures.get("peak_reserved_bytes")
        if value:
            peaks[device] = value
    return peaks


@dataclass(frozen=True)
class PhaseDone:
    """One load phase finished (``resolve``, ``map``, ``fault_in``, ``warm_up``, ``worst_case``), with the memory then.

    ``peak_bytes`` and ``needs_bytes`` are the worst-case warm-up's figures (``runner/serve.py``), which the
    pool reserves before traffic; ``details`` holds what else a phase says (its path, dtype, kernels, ...).
    """

    KIND: ClassVar[str] = "phase"
    phase: str
    seconds: float
    memory: Memory = field(default_factory=dict)
    peak_bytes: dict[str, int] | None = None
    needs_bytes: dict[str, int] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        figures = {
            key: value
            for key, value in (("peak_bytes", self.peak_bytes), ("needs_bytes", self.needs_bytes))
            if value is not None
        }
        return {
            "event": self.KIND,
            "phase": self.phase,
            "seconds": self.seconds,
            **self.details,
            **figures,
            **({"memory": self.memory} if self.memory else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PhaseDone:
        seconds = data.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise ValueError(f"'seconds' must be a number, got {seconds!r}")
        known = {"event", "phase", "seconds", "memory", "peak_bytes", "needs_bytes"}
        return cls(
            _text(data, "phase"),
            float(seconds),
            _memory(data.get("memory")),
            None if data.get("peak_bytes") is None else _sizes(data["peak_bytes"], "peak_bytes"),
            None if data.get("needs_bytes") is None else _sizes(data["needs_bytes"], "needs_bytes"),
            {k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class Ready:
    """Loaded and warmed up: the engine that serves, the memory after warm-up, and the worst-case check."""

    KIND: ClassVar[str] = "ready"
    model: str
    engine: str
    memory: Memory = field(default_factory=dict)
    plan_check: dict[str, Any] = field(default_factory=dict)
    adapters: tuple[str, ...] = ()  # the LoRA adapters loaded on the base at start

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.KIND,
            "model": self.model,
            "engine": self.engine,
            "memory": self.memory,
            "plan_check": self.plan_check,
            "adapters": list(self.adapters),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ready:
        check = data.get("plan_check") or {}
        if not isinstance(check, Mapping):
            raise ValueError(f"'plan_check' must be an object, got {check!r}")
        adapters = data.get("adapters") or []
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise ValueError(f"'adapters' must be a list of names, got {adapters!r}")
        return cls(
            _text(data, "model"), _text(data, "engine"), _memory(data.get("memory")), dict(check), tuple(adapters)
        )


@dataclass(frozen=True)
class Listening:
    """The server is up on a Unix socket or a loopback port (one of the two)."""

    KIND: ClassVar[str] = "listening"
    socket: str | None = None
    port: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": self.KIND, "socket": self.socket, "port": self.port}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Listening:
        socket, port = data.get("socket"), data.get("port")
        if (socket is not None and not isinstance(socket, str)) or (port is not None and not isinstance(port, int)):
            raise ValueError(f"a listening event names a socket path or a port, got {socket!r} and {port!r}")
        return cls(socket, port)


@dataclass(frozen=True)
class Failed:
    """The runner gives up (its last line before exit code 1): the error, in words."""

    KIND: ClassVar[str] = "failed"
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"event": self.KIND, "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Failed:
        return cls(str(data.get("error")))


@dataclass(frozen=True)
class EngineFallback:
    """The preferred engine could not serve this model; ``engine`` serves instead, for ``reason``."""

    KIND: ClassVar[str] = "engine_fallback"
    engine: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"event": self.KIND, "engine": self.engine, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineFallback:
        return cls(_text(data, "engine"), _text(data, "reason"))


@dataclass(frozen=True)
class TestBalloon:
    """Test hook (``MEMSERVE_TEST_EXTRA_BYTES``): the runner is about to use this many bytes beyond its plan."""

    __test__: ClassVar[bool] = False  # not a pytest test class, whatever its name says
    KIND: ClassVar[str] = "test_balloon"
    extra_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"event": self.KIND, "extra_bytes": self.extra_bytes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TestBalloon:
        extra = data.get("extra_bytes")
        if not isinstance(extra, int) or isinstance(extra, bool):
            raise ValueError(f"'extra_bytes' must be a byte count, got {extra!r}")
        return cls(extra)


def _count(data: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key!r} must be a count, got {value!r}")
    return value


@dataclass(frozen=True)
class Stats:
    """The engine's figures now, pushed while the runner serves (every few seconds when they change), so that a
    scrape of the gateway reads the last ones without asking a runner that may be busy or loading.

    ``kv_cache_blocks`` and ``kv_cache_blocks_used`` only from an engine with a paged KV cache."""

    KIND: ClassVar[str] = "stats"
    running: int
    waiting: int
    kv_cache_blocks: int | None = None
    kv_cache_blocks_used: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.KIND,
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_blocks": self.kv_cache_blocks,
            "kv_cache_blocks_used": self.kv_cache_blocks_used,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stats:
        return cls(
            _count(data, "running") or 0,
            _count(data, "waiting") or 0,
            _count(data, "kv_cache_blocks", optional=True),
            _count(data, "kv_cache_blocks_used", optional=True),
        )

    @classmethod
    def of(cls, stats: EngineStats) -> Stats:
        """The pushed figures of an engine's ``GET /stats`` answer."""
        blocks, used = stats.extra.get("kv_cache_blocks"), stats.extra.get("kv_cache_blocks_used")
        return cls(
            stats.running,
            stats.waiting,
            blocks if isinstance(blocks, int) else None,
            used if isinstance(used, int) else None,
        )


@dataclass(frozen=True)
class OtherEvent:
    """An event of a kind this version does not know (a newer runner's): kept whole, shown, otherwise ignored."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, **self.fields}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OtherEvent:
        return cls(str(data.get("event")), {k: v for k, v in data.items() if k != "event"})


RunnerEvent = PhaseDone | Ready | Listening | Failed | EngineFallback | TestBalloon | Stats | OtherEvent
_KINDS: dict[str, Any] = {
    kind.KIND: kind for kind in (PhaseDone, Ready, Listening, Failed, EngineFallback, TestBalloon, Stats)
}


def runner_event_from_json(data: Any) -> RunnerEvent:
    """The record of one start-up line's JSON; ValueError when it is not an event or a known kind is malformed."""
    if not isinstance(data, Mapping) or not isinstance(data.get("event"), str):
        raise ValueError(f"a runner event is an object with an 'event' name, got {data!r}")
    kind = _KINDS.get(data["event"], OtherEvent)
    record: RunnerEvent = kind.from_json(data)
    return record
