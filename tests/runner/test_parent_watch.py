"""A runner lives no longer than its gateway: real processes, the parent killed with SIGKILL.

The "gateway" here is a small Python parent that starts a runner the way the pool does (``RunnerProcess``),
so the runner gets the gateway's pid exactly as in production. The watcher's two paths (the death signal
and the ``getppid`` poll) are also checked alone, with a stand-in child that needs no model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

from memserve.engines.fit import fit_json, fit_result
from memserve.memory.probe import probe_inventory

GONE_DEADLINE_SECONDS = 30.0  # polled: the runner exits within a second; a busy machine gets slack, not a fail

GATEWAY = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from memserve.memory.fit import PlanFile
    from memserve.pool.runner_process import RunnerProcess

    async def main() -> None:
        run_dir, plan_file, wait_ready = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "ready"
        runner = RunnerProcess("tiny", PlanFile.read(plan_file), run_dir=run_dir, env={"OMP_NUM_THREADS": "1"})
        await runner.start()
        print(json.dumps({"pid": runner.pid, "socket": str(runner.socket_path), "plan": str(runner.plan_path)}),
              flush=True)
        if wait_ready:
            await runner.wait_ready(120)
            print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")

# A stand-in runner: watches its parent like the real one, with a file to remove; reports each SIGHUP it
# gets before the watcher's handler judges it, and that it survived the handler.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from memserve.runner.__main__ import PARENT_GONE_SIGNAL, leave_now, watch_parent

    owned = Path(sys.argv[1])
    owned.write_text("mine")
    watch_parent(int(sys.argv[2]), lambda: leave_now([owned]), death_signal=sys.argv[3] == "signal")
    handler = signal.getsignal(PARENT_GONE_SIGNAL)

    def say(what):
        try:
            print(what, flush=True)
        except OSError:  # whoever read it is gone
            pass

    def reporting(signum, frame):
        say("signal")
        if callable(handler):
            handler(signum, frame)
        say("survived")

    if callable(handler):
        signal.signal(PARENT_GONE_SIGNAL, reporting)
    say("watching")
    while True:
        time.sleep(0.05)
""")

# A parent that starts the stand-in from a thread which ends once the child's death signal is armed (as a
# gateway serving from a thread that later stops would), then relays what the child prints; it lives on
# until killed.
THREAD_PARENT = textwrap.dedent("""
    import os, subprocess, sys, threading
    child = []

    def spawn():
        proc = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(os.getpid()), sys.argv[3]],
                                stdout=subprocess.PIPE, text=True)
        child.append(proc)
        print(proc.pid, flush=True)
        print(proc.stdout.readline().strip(), flush=True)  # "watching": the death signal is armed

    thread = threading.Thread(target=spawn)
    thread.start()
    thread.join()
    for line in child[0].stdout:
        print(line.strip(), flush=True)
""")


def wait_gone(pid: int, deadline_seconds: float = GONE_DEADLINE_SECONDS) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts: it holds no memory and no files)."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_line(stream: IO[str] | None) -> str:
    assert stream is not None
    line = stream.readline()
    assert line, "the process ended before saying what it was doing"
    return line.strip()


def read_pid_and_watching(stream: IO[str] | None) -> int:
    """The child's pid and its "watching", printed by two processes, so in either order."""
    lines = {read_line(stream), read_line(stream)}
    pid = next(line for line in lines if line.isdigit())
    assert lines - {pid} == {"watching"}, lines
    return int(pid)


@pytest.fixture(scope="module")
def plan_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inventory = probe_inventory(memory="cpu=4GiB")
    facts, request, result = fit_result(str(tiny_model_dir), context=256, concurrency=1, inventory=inventory)
    assert result.plan is not None
    path = tmp_path_factory.mktemp("plan") / "fit.json"
    path.write_text(json.dumps(fit_json(facts, request, result, inventory)))
    return path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (with anything they left behind) if the test did not end them."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("when", ["serving", "loading"])
def test_a_runner_leaves_with_its_files_when_its_gateway_is_killed(
    plan_file: Path, tmp_path: Path, processes: list[subprocess.Popen[str]], when: str
) -> None:
    gateway = subprocess.Popen(
        [sys.executable, "-c", GATEWAY, str(tmp_path), str(plan_file), "ready" if when == "serving" else "no"],
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(gateway)
    runner = json.loads(read_line(gateway.stdout))
    socket_path, plan_path = Path(runner["socket"]), Path(runner["plan"])
    if when == "serving":
        assert read_line(gateway.stdout) == "ready"
        assert socket_path.exists()
    assert plan_path.exists() and alive(runner["pid"])
    try:
        gateway.send_signal(signal.SIGKILL)
        gateway.wait()
        assert wait_gone(runner["pid"]), f"runner {runner['pid']} outlived its gateway"
    finally:
        if alive(runner["pid"]):
            os.kill(runner["pid"], signal.SIGKILL)
    assert not socket_path.exists() and not plan_path.exists()


@pytest.mark.parametrize("death_signal", [True, False], ids=["death-signal", "poll-only"])
def test_the_watcher_ends_the_child_and_removes_its_files_once_the_parent_is_gone(
    tmp_path: Path, processes: list[subprocess.Popen[str]], death_signal: bool
) -> None:
    """Poll-only is the path where prctl is missing (or ran after the parent had already died)."""
    owned = tmp_path / "owned"
    mode = "signal" if death_signal else "poll"
    # the parent is a shell that starts the child, prints its pid and waits: kill it and the child is orphaned
    parent = subprocess.Popen(
        ["/bin/sh", "-c", f'"$0" -c "$1" "$2" $$ {mode} & echo $!; wait', sys.executable, CHILD, str(owned)],
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(parent)
    child_pid = read_pid_and_watching(parent.stdout)
    assert owned.exists()
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(child_pid), "the child outlived its parent"
    finally:
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
    assert not owned.exists()


def test_the_death_signal_of_a_spawning_thread_that_ended_is_ignored(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """Linux sends the death signal when the parent *thread* ends; the gateway process is still there."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    owned = tmp_path / "owned"
    parent = subprocess.Popen(
        [sys.executable, "-c", THREAD_PARENT, CHILD, str(owned), "signal"], stdout=subprocess.PIPE, text=True
    )
    processes.append(parent)
    child_pid = read_pid_and_watching(parent.stdout)
    try:
        assert read_line(parent.stdout) == "signal"  # sent when the spawning thread ended
        assert read_line(parent.stdout) == "survived"  # judged spurious: the parent process is still there
        assert alive(child_pid) and owned.exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(child_pid), "the child outlived its parent"
    finally:
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
    assert not owned.exists()
