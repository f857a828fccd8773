"""One runner child process: start it by a plan, follow its progress lines, sample its memory, stop it.

Only the pool uses this module (one owner for runners), and ``memserve batch run --local``, which owns the one
runner it starts (``batch/local.py``). The runner is ``python -m memserve.runner`` on a
Unix socket; it reports each load phase as a JSON line on stderr and says ``listening`` once its socket is
up. A crash, an OOM kill or an access violation ends the child only: the pool sees the exit code here.

``RunnerHandle`` is the seam the pool depends on; ``RunnerProcess`` is the real one and tests use a fake.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil

from memserve.errors import RunnerFailed
from memserve.memory.fit import PlanFile
from memserve.memory.probe import GpuProcessMemory
from memserve.pool.runner_transport import RunnerTransport
from memserve.wire.events import Failed, Listening, PhaseDone, Ready, RunnerEvent, Stats, runner_event_from_json

RUNNER_BASE_URL = "http://runner/v1"  # the host part is ignored on a Unix socket
RUN_DIR_PREFIX = "memserve-run-"
RUN_DIR_OWNER_FILE = "owner.json"
_STDERR_LINE_LIMIT_BYTES = 1 << 20
_GPU_MEMORY = GpuProcessMemory()  # one NVML session for every runner the gateway watches
_HEALTH_POLL_SECONDS = 0.02
_PF_FORKNOEXEC = 0x40  # the kernel's task flag "forked but didn't exec" (include/linux/sched.h)
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")  # CONFIG_PROC_CHILDREN
_SAME_START_SECONDS = 0.01  # start times are in clock ticks (10 ms); one process reads the same value each time


def descendants(process: psutil.Process) -> list[int]:
    """The pids of ``process``'s children, grandchildren and so on.

    Read from each thread's ``/proc/PID/task/TID/children`` (the kernel's own list, a few files): psutil's
    ``children(recursive=True)`` reads every process's ``stat`` on the host instead, 2.6 ms per sample
    with 68 processes here, paid on the gateway's loop twice a second per runner. Kernels built without
    that file get psutil's walk. A child started or reaped during the read may be missed until the next
    sample, as with any walk.
    """
    if not _PROC_CHILDREN:
        return [child.pid for child in process.children(recursive=True)]
    found: list[int] = []
    parents = [process.pid]
    while parents:
        pid = parents.pop()
        try:
            with os.scandir(f"/proc/{pid}/task") as tasks:  # closed however the walk ends
                for task in tasks:
                    with open(f"{task.path}/children") as children:
                        kids = [int(kid) for kid in children.read().split()]
                    found += kids
                    parents += kids
        except OSError:  # it (or one of its threads) ended while it was read: the rest of the tree still counts
            continue
    return found


class RunnerHandle(Protocol):
    """What the pool needs from a runner, real or fake."""

    name: str
    phase: str  # "spawned", then each finished load phase (resolve, map, fault_in, warm_up), then "ready"

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def client(self) -> httpx.AsyncClient: ...  # speaks to the runner; base URL is RUNNER_BASE_URL

    @property
    def transport(self) -> httpx.AsyncBaseTransport: ...  # the client's transport; the gateway's hot path uses it

    @property
    def last_stats(self) -> tuple[Stats, float] | None: ...  # its engine's last pushed figures, and when (monotonic)

    async def wait_ready(self, timeout_seconds: float) -> Ready | None: ...  # its ready report, if it sent one

    async def wait_exit(self) -> int: ...

    def exit_reason(self) -> str: ...

    def sample_memory(self) -> dict[str, int]: ...

    async def stop(self, grace_seconds: float = 10.0) -> None: ...

    def kill(self) -> None: ...


# spawn(name, launch, on_event) -> a started runner, which reports its start-up events to on_event
Spawner = Callable[[str, PlanFile, Callable[[RunnerEvent], None]], Awaitable[RunnerHandle]]


def forked_not_exec(pid: int) -> bool:
    """Whether ``pid`` is still a forked copy of its parent, not yet running a program of its own: the kernel's
    PF_FORKNOEXEC flag (field 9 of ``/proc/PID/stat``), cleared by exec.

    Until then its resident pages are its parent's: the same pages after vfork (one address space), shared
    copy-on-write after fork. Its RSS counts them a second time: a runner's ``find_library`` once ran
    ``ldconfig -p`` through vfork and the sample in that window read twice the runner's 354 MiB, which got the
    runner killed while starting. False where ``/proc`` cannot tell (the process is then counted).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
        return bool(int(line[line.rindex(b")") + 2 :].split()[6]) & _PF_FORKNOEXEC)
    except (OSError, ValueError, IndexError):
        return False


def new_run_dir(base: Path | None = None) -> Path:
    """A fresh folder for this gateway's runner sockets and plan files, its owner recorded inside; folders of
    gateways that are gone (a ``kill -9`` leaves its folder behind) are removed first.

    It lives in the temp folder (``base``), whose path is short: a Unix socket's path is limited to ~107 bytes.
    """
    parent = base if base is not None else Path(tempfile.gettempdir())
    remove_dead_run_dirs(parent)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=parent))
    (run_dir / RUN_DIR_OWNER_FILE).write_text(json.dumps(owner_record(os.getpid())))
    return run_dir


def owner_record(pid: int) -> dict[str, Any]:
    """Who owns a run folder: the pid, and what tells that process from a later one given the same pid (its
    start time) or one in another container sharing the temp folder (host name, pid namespace)."""
    return {
        "pid": pid,
        "started": psutil.Process(pid).create_time(),
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
    }


def owner_alive(record: Mapping[str, Any]) -> bool | None:
    """True while the recorded process runs, False once it is gone, None when this process cannot tell
    (another host or pid namespace, or a record it does not understand): such a folder is left alone."""
    try:
        pid, started = int(record["pid"]), float(record["started"])
    except (KeyError, TypeError, ValueError):
        return None
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < _SAME_START_SECONDS  # else the pid was reused
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


def remove_dead_run_dirs(parent: Path) -> list[Path]:
    """Remove this user's run folders in ``parent`` whose owner is gone; the folders removed.

    A folder without a readable owner record is kept: it may be one being made right now, or one of a
    memserve too old to write a record, whose gateway may still be running.
    """
    removed: list[Path] = []
    for folder in parent.glob(RUN_DIR_PREFIX + "*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            record = json.loads((folder / RUN_DIR_OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and owner_alive(record) is False:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def describe_exit(returncode: int, last_lines: list[str]) -> str:
    """Why a runner ended, in words: the signal's name, or the exit code and the runner's last error line."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (by the kernel's OOM killer, the watchdog or a person)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    last = next((line for line in reversed(last_lines) if line.strip()), "")
    return f"exited with code {returncode}" + (f": {last.strip()[:500]}" if last else "")


class ChildRunner:
    """What every runner child shares, ours or an external engine's: its process, the client that speaks to it,
    its memory (RSS of its process tree plus NVML per process) and SIGKILL to its process group."""

    def __init__(
        self,
        name: str,
        launch: PlanFile,
        transport: RunnerTransport,
        *,
        env: Mapping[str, str] | None,
        gpu_memory: Callable[[Collection[int]], dict[str, int]] | None,
    ) -> None:
        self.name, self.launch = name, launch
        self.phase = "spawned"
        self._env = dict(env) if env is not None else None
        self._proc: asyncio.subprocess.Process | None = None
        self._gpu_memory = gpu_memory or _GPU_MEMORY
        self._transport = transport
        self._client = httpx.AsyncClient(
            base_url=RUNNER_BASE_URL, timeout=httpx.Timeout(None, connect=10.0), transport=transport
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def client(self) -> httpx.AsyncClient:
        return self._client

    @property
    def transport(self) -> RunnerTransport:
        return self._transport

    def sample_memory(self) -> dict[str, int]:
        """Bytes in use per device right now: the RSS of the child's process tree on cpu, and what NVML
        says the tree holds on each GPU it uses (``GpuProcessMemory``).

        RSS counts the mapped weights (file-backed) too: they take RAM as surely as the anonymous pages. A
        process of the tree that has forked but not exec'd yet is left out of the cpu sum (``forked_not_exec``):
        its pages are its parent's. For the child itself that parent is the gateway (a whole test process with
        torch loaded, say), so nothing is measured until it runs the runner's program. A worker that forks and
        never execs is left out too: runners start theirs with exec (vLLM is told to spawn).
        """
        if self.pid is None or self.returncode is not None or forked_not_exec(self.pid):
            return {}
        try:
            root = psutil.Process(self.pid)
            tree = [root, *(psutil.Process(pid) for pid in descendants(root))]
            sample = {"cpu": sum(p.memory_info().rss for p in tree if p is root or not forked_not_exec(p.pid))}
        except psutil.Error:
            return {}
        sample.update(self._gpu_memory([p.pid for p in tree]))
        return sample

    def kill(self) -> None:
        """SIGKILL to the child's process group: it and anything it started."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)


class RunnerProcess(ChildRunner):
    """A real runner: ``python -m memserve.runner --plan P --socket S --name N`` in its own session."""

    def __init__(
        self,
        name: str,
        launch: PlanFile,
        *,
        run_dir: Path,
        on_event: Callable[[RunnerEvent], None] | None = None,
        env: Mapping[str, str] | None = None,
        gpu_memory: Callable[[Collection[int]], dict[str, int]] | None = None,
    ) -> None:
        socket_path = run_dir / f"{name}.sock"
        super().__init__(name, launch, RunnerTransport(str(socket_path)), env=env, gpu_memory=gpu_memory)
        self.plan_path = run_dir / f"{name}.plan.json"
        self.socket_path = socket_path
        self._on_event = on_event or (lambda event: None)
        self._reader: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._ready_event: Ready | None = None
        self._stats: tuple[Stats, float] | None = None
        self._failure: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)

    @property
    def last_stats(self) -> tuple[Stats, float] | None:
        return self._stats

    async def start(self) -> None:
        self.plan_path.write_text(json.dumps(self.launch.to_json()))
        self.socket_path.unlink(missing_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "memserve.runner",
            "--plan",
            str(self.plan_path),
            "--socket",
            str(self.socket_path),
            "--name",
            self.name,
            "--parent-pid",
            str(os.getpid()),  # the runner ends when this process does
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**runner_environ(), "MEMSERVE_PROGRESS": "json", **(self._env or {})},
            limit=_STDERR_LINE_LIMIT_BYTES,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_stderr(), name=f"runner-{self.name}-stderr")

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while True:
            try:
                raw = await self._proc.stderr.readline()
            except ValueError:  # a line past the limit: keep reading
                continue
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = runner_event_from_json(json.loads(line))
            except ValueError:  # not JSON (a library's own line), or not an event this version reads
                self._tail.append(line)
                continue
            if isinstance(event, PhaseDone):
                self.phase = event.phase
            elif isinstance(event, Ready):
                self._ready_event = event
            elif isinstance(event, Listening):
                self._listening.set()
            elif isinstance(event, Failed):
                self._failure = event.error
            elif isinstance(event, Stats):  # kept for /metrics; the pool has nothing to do with it
                self._stats = (event, time.monotonic())
                continue
            self._on_event(event)
        await self._proc.wait()

    async def wait_ready(self, timeout_seconds: float) -> Ready | None:
        """The runner's ready report, once its socket answers /health; RunnerFailed if it exits or times out."""
        assert self._proc is not None
        exited = asyncio.ensure_future(self.wait_exit())
        try:
            async with asyncio.timeout(timeout_seconds):
                listening = asyncio.ensure_future(self._listening.wait())
                await asyncio.wait({listening, exited}, return_when=asyncio.FIRST_COMPLETED)
                listening.cancel()
                while not exited.done():
                    try:
                        response = await self._client.get("http://runner/health", timeout=5.0)
                        if response.status_code == 200:
                            self.phase = "ready"
                            return self._ready_event
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(_HEALTH_POLL_SECONDS)
        except TimeoutError:
            raise RunnerFailed(
                f"runner {self.name} was not ready after {timeout_seconds:.0f} s (last phase: "
                f"{self.phase}); raise load_timeout_seconds or check the model"
            ) from None
        finally:
            exited.cancel()
        raise RunnerFailed(f"runner {self.name} ended while loading: {self.exit_reason()}")

    async def wait_exit(self) -> int:
        assert self._proc is not None
        if self._reader is not None:
            await asyncio.shield(self._reader)  # drain stderr first, so the reason is complete
        return await self._proc.wait()

    def exit_reason(self) -> str:
        if self.returncode is None:
            return "still running"
        if self.returncode > 0 and self._failure:
            return f"exited with code {self.returncode}: {self._failure}"
        return describe_exit(self.returncode, list(self._tail))

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM (the runner drains and closes its engine), then SIGKILL after ``grace_seconds``."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait_exit(), grace_seconds)
            except TimeoutError:
                self.kill()
                await self.wait_exit()
        await self._cleanup()

    async def _cleanup(self) -> None:
        await self._client.aclose()
        self.socket_path.unlink(missing_ok=True)
        self.plan_path.unlink(missing_ok=True)


def process_spawner(
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    gpu_total_bytes: Callable[[], Mapping[str, int]] | None = None,
) -> Spawner:
    """The real spawner: each call starts the runner its plan names (``plan.runner``).

    ``transformers``: memserve's own runner process, with its socket and plan file in ``run_dir``. ``vllm``,
    ``llama.cpp``: the engine's own server as an ``ExternalRunner`` (``pool/external.py``) on a loopback port,
    started with the argv its ``memserve.engines`` module computes from the plan. ``gpu_total_bytes`` gives
    each GPU's total (the pool knows it from its inventory; NVML is asked otherwise).
    """

    async def spawn(name: str, launch: PlanFile, on_event: Callable[[RunnerEvent], None]) -> RunnerHandle:
        if launch.plan.runner != "transformers":
            from memserve.pool.external import start_external  # it imports this module

            return await start_external(name, launch, env=env, gpu_total_bytes=gpu_total_bytes or _gpu_totals)
        runner = RunnerProcess(name, launch, run_dir=run_dir, on_event=on_event, env=env)
        await runner.start()
        return runner

    return spawn


def _gpu_totals() -> dict[str, int]:
    """Each visible GPU's total bytes, from NVML (no CUDA context); {} on a host without GPUs."""
    from memserve.memory.probe import cuda_devices

    return {device.name: device.total_bytes for device in cuda_devices()[0]}


_SECRETS = ("MEMSERVE_ADMIN_KEY", "MEMSERVE_API_KEY")


def runner_environ(without: Collection[str] = ()) -> dict[str, str]:
    """The gateway's environment without its API keys (and the names in ``without``): a runner runs model code
    and never needs them."""
    return {name: value for name, value in os.environ.items() if name not in _SECRETS and name not in without}
