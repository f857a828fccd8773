"""A runner the batch starts for itself (``memserve batch run --local MODEL``), restarted if it dies.

The model is planned exactly as ``memserve run-model`` and ``fit`` plan it (``engines.fit.fit_result`` on the
probed inventory), so a model that cannot fit is refused with the planner's NoFit message before anything
starts. The runner is the pool's ``RunnerProcess`` (``python -m memserve.runner`` on a Unix socket, ended
with its parent however the parent dies); this module only adds what a batch needs: the runner as an httpx
transport that survives restarts, and a supervisor that starts a new runner when one exits (an OOM kill, a
crash on one request). Requests in flight when it dies fail (the executor retries them); requests sent while
the next one loads wait for it rather than spend their retries. A runner that keeps dying without answering
anything in between ends the run after ``max_restarts`` (a request that crashes it every time ends in the
errors file first, after its own retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import httpx

from memserve.engines.fit import fit_result
from memserve.errors import InsufficientMemory, RunnerFailed
from memserve.memory.fit import PlanFile
from memserve.memory.probe import probe_inventory
from memserve.pool.runner_process import RUNNER_BASE_URL, RunnerProcess, new_run_dir

LOAD_TIMEOUT_SECONDS = 600.0
MAX_RESTARTS = 10


def plan_local(
    source: str,
    *,
    concurrency: int,
    context: int | None = None,
    memory: str | None = None,
    headroom: str | None = None,
    quantization: str = "auto",
) -> PlanFile:
    """The plan ``run-model`` would use for ``source``; :class:`InsufficientMemory` (the NoFit) if none fits."""
    inventory = probe_inventory(memory=memory, headroom=headroom)
    facts, _, result = fit_result(
        source, context=context, concurrency=concurrency, quantization=quantization, inventory=inventory
    )
    if result.plan is None:
        assert result.nofit is not None
        raise InsufficientMemory(result.nofit.message)
    return PlanFile(facts.source, result.plan)


def served_name(source: str, name: str | None) -> str:
    """The model name the runner answers to: ``name``, else the folder's name (as ``run-model`` names it)."""
    if name:
        return name
    folder = Path(source).expanduser()
    return folder.resolve().name if folder.is_dir() else source.rstrip("/").rsplit("/", 1)[-1]


class LocalRunner(httpx.AsyncBaseTransport):
    """One runner for one batch, as an httpx transport: requests go to whichever runner is up now."""

    def __init__(self, launch: PlanFile, *, name: str, max_restarts: int = MAX_RESTARTS) -> None:
        self.launch, self.name, self.max_restarts = launch, name, max_restarts
        self.restarts = 0
        self._failing = 0  # restarts since the runner last answered a request
        self._answered = False
        self.load_seconds: float | None = None
        self.peak_memory_bytes = 0  # the most any sample saw: what the batch needed at most
        self._run_dir: Path | None = None
        self._runner: RunnerProcess | None = None
        self._up = asyncio.Event()
        self._stopping = False

    def client(self) -> httpx.AsyncClient:
        """A client for the executor: no read timeout (a long generation is not a failure)."""
        return httpx.AsyncClient(base_url=RUNNER_BASE_URL, transport=self, timeout=httpx.Timeout(None, connect=10.0))

    async def start(self) -> None:
        """Start the runner and wait until it answers; RunnerFailed if it cannot load."""
        self._run_dir = new_run_dir()
        await self._start_one()

    async def _start_one(self) -> None:
        assert self._run_dir is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        runner = RunnerProcess(self.name, self.launch, run_dir=self._run_dir)
        self._runner = runner
        await runner.start()
        await runner.wait_ready(LOAD_TIMEOUT_SECONDS)
        self.load_seconds = loop.time() - started
        self._up.set()

    async def supervise(self) -> None:
        """Restart the runner each time it exits, up to ``max_restarts`` times; then RunnerFailed."""
        while not self._stopping:
            runner = self._runner
            assert runner is not None, "supervise() before start()"
            await runner.wait_exit()
            if self._stopping:
                return
            self._up.clear()
            reason = runner.exit_reason()
            await runner.stop()  # closes its transport and removes its socket
            self._failing = 0 if self._answered else self._failing + 1
            if self._failing > self.max_restarts:
                raise RunnerFailed(
                    f"the runner for {self.name} exited {self._failing} times without answering (last: {reason}); "
                    "finished results are kept: check the model, then run the same command to resume"
                )
            self.restarts += 1
            self._answered = False
            await self._start_one()

    def memory_bytes(self) -> int:
        """What the runner's process tree holds now, summed over its devices (0 while none is up)."""
        runner = self._runner
        now = sum(runner.sample_memory().values()) if runner is not None else 0
        self.peak_memory_bytes = max(self.peak_memory_bytes, now)
        return now

    @property
    def pid(self) -> int | None:
        return self._runner.pid if self._runner is not None else None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._up.wait()  # while a new runner loads (the supervisor ends the run if it cannot)
        runner = self._runner
        if runner is None or self._stopping:
            raise httpx.ConnectError(f"the runner for {self.name} was stopped", request=request)
        response = await runner.transport.handle_async_request(request)
        if response.status_code < 500:
            self._answered = True
        return response

    async def aclose(self) -> None:
        """Stop the runner (SIGTERM, then SIGKILL) and remove its run folder."""
        self._stopping = True
        self._up.clear()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.stop(grace_seconds=5.0)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)


__all__ = ["LocalRunner", "plan_local", "served_name"]
