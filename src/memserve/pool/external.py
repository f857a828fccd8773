"""An external engine's OpenAI-compatible server (``vllm serve``, ``llama-server``) started and watched as a runner.

The pool supervises it exactly like its own runner (``pool/runner_process.py``): it is started in its own
process group, it is ready once ``GET /health`` answers 200 and then ``GET /v1/models`` lists the pool's
name for it, its memory is the RSS of its process tree plus what NVML says that tree holds on each GPU,
and ``stop`` is SIGTERM to the group, then SIGKILL after the grace. The gateway reaches it through the same
``RunnerTransport`` as its own runners, over TCP on ``127.0.0.1:PORT`` instead of a Unix socket.

A server we did not write can misbehave in ways ours cannot, and each is bounded here:

- it may write megabytes of logs: stdout and stderr are read in chunks as they come (the pipes never
  fill, so it never blocks on a write) and only the last ``LOG_TAIL_LINES`` lines, at most
  ``LOG_TAIL_BYTES``, are kept for error messages;
- it may never become ready, or listen on another port than the one it was given: after the load
  timeout it is killed, and the error carries its last log lines;
- it may ignore SIGTERM: SIGKILL to the whole group follows the grace;
- its main process may die and leave helpers behind (vLLM's engine core is a child process): once the
  leader has exited the rest of its group is killed, so nothing outlives it or holds the pipes open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import inspect
import os
import signal
import time
from collections.abc import Callable, Collection, Mapping
from types import ModuleType
from typing import Protocol

import httpx

from memserve.errors import RunnerFailed
from memserve.memory.fit import PlanFile
from memserve.net import free_port
from memserve.pool.runner_process import ChildRunner, describe_exit, runner_environ
from memserve.pool.runner_transport import RunnerTransport
from memserve.wire.events import Ready, Stats

LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 64 * 1024
LOG_LINE_BYTES = 2048  # a longer line is kept cut to this
ERROR_TAIL_LINES = 20  # the last lines an error message quotes
LOOPBACK = "127.0.0.1"
_READ_CHUNK_BYTES = 1 << 16
_POLL_SECONDS = 0.05
_EXIT_POLL_SECONDS = 0.05
_READER_DRAIN_SECONDS = 5.0  # after the group is gone, how long its pipes may take to report their end
# the gateway is the only door: a server key in its environment would make the server refuse the gateway itself
_SERVER_SECRETS = ("VLLM_API_KEY", "LLAMA_API_KEY")

# the module in memserve.engines that computes each external runner kind's command line
ENGINE_MODULES = {"vllm": "vllm", "llama.cpp": "llamacpp"}
INSTALL_HINTS = {
    "vllm": "pip install 'memserve[vllm]' on a CUDA machine",
    "llama.cpp": "pip install 'memserve[llamacpp]', or put llama.cpp's llama-server on PATH",
}


class Arguments(Protocol):
    """``memserve.engines.<module>.arguments``: the server's argv (``argv[0]`` the executable) for a plan."""

    def __call__(self, name: str, launch: PlanFile, *, host: str, port: int) -> list[str]: ...


class LogTail:
    """The last lines a process wrote, bounded by count and by bytes, fed with raw chunks as they arrive."""

    def __init__(self, max_lines: int = LOG_TAIL_LINES, max_bytes: int = LOG_TAIL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._bytes = 0
        self._partial = b""
        self.total_bytes = 0  # everything seen, kept or not

    def feed(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        pieces = (self._partial + chunk).split(b"\n")
        self._partial = pieces.pop()[:LOG_LINE_BYTES]  # an unfinished line, never longer than one kept line
        for piece in pieces[-(self._lines.maxlen or len(pieces)) :]:
            self._add(piece)

    def close(self) -> None:
        """The stream ended: keep its unfinished last line."""
        if self._partial:
            self._add(self._partial)
            self._partial = b""

    def lines(self) -> list[str]:
        return list(self._lines)

    def _add(self, raw: bytes) -> None:
        line = raw[:LOG_LINE_BYTES].decode(errors="replace").rstrip("\r")
        if len(self._lines) == self._lines.maxlen:
            self._bytes -= len(self._lines[0])
        self._lines.append(line)
        self._bytes += len(line)
        while self._bytes > self.max_bytes and len(self._lines) > 1:
            self._bytes -= len(self._lines.popleft())


def engine_module(runner: str) -> ModuleType:
    """The engine module for ``runner`` (its ``arguments`` function, and the ``ENVIRON`` it may ask for),
    imported only when it is needed.

    RunnerFailed names the install command when the module is not there (a memserve without that engine).
    """
    module_name = ENGINE_MODULES.get(runner)
    if module_name is None:
        raise RunnerFailed(
            f"runner kind {runner!r} is not an external engine; expected one of {', '.join(ENGINE_MODULES)}"
        )
    try:
        return importlib.import_module(f"memserve.engines.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"memserve.engines.{module_name}".startswith(exc.name):
            raise
        raise RunnerFailed(
            f"this memserve has no {runner} engine (memserve.engines.{module_name} is missing); "
            f"upgrade memserve, and {INSTALL_HINTS[runner]}"
        ) from None


class ExternalRunner(ChildRunner):
    """One external OpenAI-compatible server as a runner. Satisfies ``RunnerHandle``."""

    def __init__(
        self,
        name: str,
        launch: PlanFile,
        argv: list[str],
        *,
        port: int,
        host: str = LOOPBACK,
        env: Mapping[str, str] | None = None,
        gpu_memory: Callable[[Collection[int]], dict[str, int]] | None = None,
    ) -> None:
        super().__init__(name, launch, RunnerTransport(address=(host, port)), env=env, gpu_memory=gpu_memory)
        self.argv = list(argv)
        self.host, self.port = host, port
        self._readers: list[asyncio.Task[None]] = []
        self.log = LogTail()

    @property
    def address(self) -> str:
        """Where it listens, ``127.0.0.1:PORT`` (a RunnerProcess's ``socket_path``, for /api/ps)."""
        return f"{self.host}:{self.port}"

    @property
    def last_stats(self) -> tuple[Stats, float] | None:
        """None: an external server pushes no figures; the gateway's own request records feed /metrics."""
        return None

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**runner_environ(without=_SERVER_SECRETS), **(self._env or {})},
                start_new_session=True,  # its own process group: stop and kill reach every process it starts
            )
        except OSError as exc:
            raise RunnerFailed(
                f"runner {self.name} could not start {self.argv[0]}: {exc.strerror or exc}; "
                f"check the engine's command ({' '.join(self.argv[:2])} ...)"
            ) from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._drain(stream), name=f"external-{self.name}-{what}")
            for what, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr))
        ]

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        """Read a pipe to its end in chunks, keeping only the tail: the server never blocks on a full pipe."""
        while chunk := await stream.read(_READ_CHUNK_BYTES):
            self.log.feed(chunk)
        self.log.close()

    async def wait_ready(self, timeout_seconds: float) -> Ready | None:
        """None once ``/health`` answers 200 and ``/v1/models`` lists the model; RunnerFailed if it exits first,
        or (killed, with its last log lines) when it is not ready within ``timeout_seconds``."""
        assert self._proc is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_seconds):
                while self._proc.returncode is None:
                    if await self._answers():
                        self.phase = "ready"
                        return None
                    await asyncio.sleep(_POLL_SECONDS)
        except TimeoutError:
            self.kill()
            await self.wait_exit()
            raise RunnerFailed(
                f"runner {self.name} ({os.path.basename(self.argv[0])}) was not ready on {self.host}:{self.port} "
                f"after {time.monotonic() - started:.0f} s (last step: {self.phase}) and was killed; raise "
                f"load_timeout_seconds or check the server. Its last log lines:{self._quoted_tail()}"
            ) from None
        await self.wait_exit()
        raise RunnerFailed(f"runner {self.name} ended while loading: {self.exit_reason()}")

    async def _answers(self) -> bool:
        """Whether the server is ready: /health is 200, then /v1/models lists the name it was told to serve."""
        try:
            health = await self._client.get("http://runner/health", timeout=5.0)
            if health.status_code != 200:
                return False
            self.phase = "health"
            models = await self._client.get("/models", timeout=5.0)
        except httpx.TransportError:
            return False
        if models.status_code != 200:
            return False
        try:
            ids = [str(m.get("id")) for m in models.json().get("data", [])]
        except (ValueError, AttributeError, TypeError):
            return False
        if self.name not in ids:
            self.kill()
            await self.wait_exit()
            raise RunnerFailed(
                f"runner {self.name}: the server answers, but serves {ids or 'no models'} instead of {self.name!r}; "
                "its command line must name the model (--served-model-name, --alias)"
            )
        return True

    async def wait_exit(self) -> int:
        """The leader's exit code, once it has exited; the rest of its process group is killed then, so no
        helper outlives it, and its pipes are read to their end."""
        assert self._proc is not None
        # Process.wait() also waits for the pipes to close, which a helper that inherited them (vLLM's engine
        # core) holds open after the leader died: the exit itself is the returncode the child watcher sets
        while self._proc.returncode is None:
            await asyncio.sleep(_EXIT_POLL_SECONDS)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):  # with the group gone the pipes end, and wait() with them
            await asyncio.wait_for(asyncio.shield(self._proc.wait()), _READER_DRAIN_SECONDS)
        if self._readers:
            await asyncio.wait([asyncio.shield(r) for r in self._readers], timeout=_READER_DRAIN_SECONDS)
        return self._proc.returncode

    def exit_reason(self) -> str:
        if self.returncode is None:
            return "still running"
        reason = describe_exit(self.returncode, self.log.lines())
        return reason + (f". Its last log lines:{self._quoted_tail()}" if self.returncode >= 0 else "")

    def _quoted_tail(self) -> str:
        lines = [line for line in self.log.lines() if line.strip()][-ERROR_TAIL_LINES:]
        return "".join(f"\n  {line}" for line in lines) if lines else " (none)"

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM to the server's group, SIGKILL after ``grace_seconds`` (a server that ignores SIGTERM)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait_exit(), grace_seconds)
            except TimeoutError:
                self.kill()
        if self._proc is not None:
            await self.wait_exit()
        await self._client.aclose()


async def start_external(
    name: str,
    launch: PlanFile,
    *,
    env: Mapping[str, str] | None = None,
    gpu_total_bytes: Callable[[], Mapping[str, int]] | None = None,
    gpu_memory: Callable[[Collection[int]], dict[str, int]] | None = None,
) -> ExternalRunner:
    """Start the external server that serves ``launch`` (its ``plan.runner`` names the engine) on a free port.

    ``gpu_total_bytes`` gives each GPU's total (vLLM's ``--gpu-memory-utilization`` is a fraction of it); it is
    passed to the engine's ``arguments`` only when that accepts it.
    """
    module = engine_module(launch.plan.runner)
    arguments: Arguments = module.arguments
    # the engine's own settings (vLLM: spawn its workers), unless the gateway's environment sets them itself
    own = {key: value for key, value in getattr(module, "ENVIRON", {}).items() if key not in os.environ}
    env = {**own, **(env or {})}
    port = free_port()
    if gpu_total_bytes is not None and "total_bytes" in inspect.signature(arguments).parameters:
        argv = arguments(name, launch, host=LOOPBACK, port=port, total_bytes=dict(gpu_total_bytes()))  # type: ignore[call-arg]
    else:
        argv = arguments(name, launch, host=LOOPBACK, port=port)
    runner = ExternalRunner(name, launch, argv, port=port, env=env, gpu_memory=gpu_memory)
    await runner.start()
    return runner
