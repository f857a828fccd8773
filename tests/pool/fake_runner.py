"""A scripted ``RunnerHandle`` and spawner for ModelPool tests: no process, no socket, no torch.

A :class:`FakeRunner` plays one runner's life from a :class:`RunnerScript`: it reports load phases,
becomes ready after a delay (or only when the test calls :meth:`FakeRunner.make_ready`), can fail
while loading, can "crash" later with any return code, reports whatever memory the test sets, and
records every ``stop`` and ``kill``. Exits read like the real runner's (``describe_exit``), so the
pool's reasons are the ones users would see.

:class:`FakeSpawner` is the pool's ``Spawner``: it hands out runners from per-model scripts (the
default script otherwise) and keeps what it spawned, in order, with the plan files it was given.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from memserve.errors import RunnerFailed
from memserve.memory.estimate import DeviceNeed, GiB
from memserve.memory.fit import PlanFile
from memserve.memory.planner import Plan
from memserve.pool.runner_process import RUNNER_BASE_URL, describe_exit
from memserve.wire.events import PhaseDone, Ready, RunnerEvent, Stats
from tests.serving import StreamingASGITransport

LOAD_PHASES = ("resolve", "map", "fault_in", "warm_up")
CPU_PLAN = Plan(
    "cpu",
    "bfloat16",
    "none",
    context_tokens=2048,
    concurrency=2,
    max_batch_tokens=2048,
    devices={"cpu": DeviceNeed(weights_bytes=GiB, kv_cache_bytes=64 * 2**20, free_bytes=8 * GiB)},
    device_map={"model.layers.0": "cpu"},
)
_pids = itertools.count(40_000)


def plan_file(source: str = "/models/m", **limits: Any) -> PlanFile:
    """A small CPU plan file for ``source`` (``reserved_bytes``, ``max_queue`` as given)."""
    return PlanFile(source, CPU_PLAN, **limits)


@dataclass
class RunnerScript:
    """How one fake runner behaves.

    ``ready_after_seconds``: when its load finishes on its own (phases, then ready or the failure);
    None: only when the test calls ``make_ready`` / ``exit``. ``fail_while_loading``: the error line it
    dies with instead of becoming ready (exit code ``fail_returncode``). ``memory_bytes``: what
    ``sample_memory`` reports per device (the test may change it on the runner later).
    """

    ready_after_seconds: float | None = 0.0
    phases: tuple[str, ...] = LOAD_PHASES
    fail_while_loading: str | None = None
    fail_returncode: int = 1
    memory_bytes: dict[str, int] = field(default_factory=dict)
    ready_report: Ready | None = None
    exit_on_kill: bool = True
    app: Any = None  # an ASGI app that answers the runner's requests (a FakeOpenAI, say); None: a JSON echo


class FakeRunner:
    """One scripted runner. Satisfies ``memserve.pool.runner_process.RunnerHandle``."""

    def __init__(
        self,
        name: str,
        launch: PlanFile,
        on_event: Callable[[RunnerEvent], None],
        script: RunnerScript,
        journal: list[tuple[str, str]],
    ) -> None:
        self.name, self.launch = name, launch
        self.phase = "spawned"
        self.script = script
        self.memory_bytes = dict(script.memory_bytes)
        self.stop_calls = 0
        self.kill_calls = 0
        self.samples_taken = 0
        self._pid = next(_pids)
        self._returncode: int | None = None
        self._error: str | None = None
        self._on_event = on_event
        self._journal = journal
        self._ready = asyncio.Event()
        self._stats: tuple[Stats, float] | None = None
        self._exited = asyncio.Event()
        self._transport: httpx.AsyncBaseTransport = (
            StreamingASGITransport(script.app) if script.app is not None else httpx.MockTransport(self._answer)
        )
        self._client = httpx.AsyncClient(base_url=RUNNER_BASE_URL, transport=self._transport)

    # ------------------------------------------------------------------------------ RunnerHandle

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def client(self) -> httpx.AsyncClient:
        return self._client

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        return self._transport

    @property
    def last_stats(self) -> tuple[Stats, float] | None:
        return self._stats

    async def wait_ready(self, timeout_seconds: float) -> Ready | None:
        """The ready report; RunnerFailed when it exits first or takes longer than ``timeout_seconds``."""
        ready = asyncio.ensure_future(self._ready.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if self._returncode is not None:
            raise RunnerFailed(f"runner {self.name} ended while loading: {self.exit_reason()}")
        if not self._ready.is_set():
            raise RunnerFailed(f"runner {self.name} was not ready after {timeout_seconds:.0f} s")
        return self.script.ready_report

    async def wait_exit(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def exit_reason(self) -> str:
        if self._returncode is None:
            return "still running"
        if self._returncode > 0 and self._error:
            return f"exited with code {self._returncode}: {self._error}"
        return describe_exit(self._returncode, [])

    def sample_memory(self) -> dict[str, int]:
        if self._returncode is not None:
            return {}
        self.samples_taken += 1
        return dict(self.memory_bytes)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        self.stop_calls += 1
        self._journal.append(("stop", self.name))
        self.exit(-9 if self.kill_calls else 0)
        await self._client.aclose()

    def kill(self) -> None:
        self.kill_calls += 1
        self._journal.append(("kill", self.name))
        if self.script.exit_on_kill:
            self.exit(-9)

    # ------------------------------------------------------------------------------ the script

    def start(self) -> None:
        """Play the script's load on the running loop (phases, then ready or the failure)."""
        if self.script.ready_after_seconds is not None:
            asyncio.get_running_loop().call_later(self.script.ready_after_seconds, self._finish_load)

    def emit_phase(
        self,
        phase: str,
        seconds: float = 0.01,
        peak_rss_bytes: int | None = None,
        *,
        peak_bytes: dict[str, int] | None = None,
        needs_bytes: dict[str, int] | None = None,
        **details: Any,
    ) -> None:
        """Report a finished load phase, as the real runner's progress line does (with its memory, if given,
        the worst-case warm-up's ``peak_bytes`` and ``needs_bytes``, and any other details)."""
        self.phase = phase
        memory = (
            {} if peak_rss_bytes is None else {"cpu": {"rss_bytes": peak_rss_bytes, "peak_rss_bytes": peak_rss_bytes}}
        )
        self._on_event(PhaseDone(phase, seconds, memory, peak_bytes, needs_bytes, details))

    def push_stats(self, stats: Stats) -> None:
        """The engine's figures, as the real runner pushes them on stderr while it serves."""
        self._stats = (stats, asyncio.get_running_loop().time())

    def make_ready(self) -> None:
        if self._returncode is None:
            self.phase = "ready"
            self._ready.set()

    def exit(self, returncode: int, error: str | None = None) -> None:
        """End the "process" (a crash when nobody asked for it); the first exit code wins."""
        if self._returncode is None:
            self._returncode, self._error = returncode, error
            self._exited.set()

    def _finish_load(self) -> None:
        if self._returncode is not None:
            return
        for phase in self.script.phases:
            self.emit_phase(phase)
        if self.script.fail_while_loading is not None:
            self.exit(self.script.fail_returncode, self.script.fail_while_loading)
        else:
            self.make_ready()

    def _answer(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"runner": self.name, "pid": self._pid, "path": request.url.path})


class FakeSpawner:
    """The pool's spawner: runners from per-model scripts, in order, and a journal of spawns, stops and kills."""

    def __init__(self, default: RunnerScript | None = None) -> None:
        self.default = default or RunnerScript()
        self.scripts: dict[str, list[RunnerScript]] = {}
        self.spawned: list[FakeRunner] = []
        self.spawn_times: list[float] = []  # the loop's clock at each spawn
        self.journal: list[tuple[str, str]] = []  # ("spawn" | "stop" | "kill", model name), in order

    def script(self, name: str, *scripts: RunnerScript) -> None:
        """The next runners of ``name`` follow these scripts, one each; later ones follow the default."""
        self.scripts.setdefault(name, []).extend(scripts)

    def runners(self, name: str) -> list[FakeRunner]:
        return [r for r in self.spawned if r.name == name]

    async def __call__(self, name: str, launch: PlanFile, on_event: Callable[[RunnerEvent], None]) -> FakeRunner:
        queue = self.scripts.get(name)
        script = queue.pop(0) if queue else self.default
        runner = FakeRunner(name, launch, on_event, script, self.journal)
        self.spawned.append(runner)
        self.spawn_times.append(asyncio.get_running_loop().time())
        self.journal.append(("spawn", name))
        runner.start()
        return runner
