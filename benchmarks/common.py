"""What several benchmarks share: a real runner process on a plan, started on a free port and stopped after, and
a sampler of a process tree's peak RSS.

Scripts in this folder run as ``python benchmarks/NAME.py``, so this module is imported as ``common``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from memserve.memory.fit import PlanFile
from memserve.net import free_port
from memserve.pool.runner_process import forked_not_exec

READY_SECONDS = 1800  # a deadline, not a pace: a 1b model quantized at load on a slow, busy CPU


@contextmanager
def runner(
    launch: PlanFile,
    folder: Path,
    *,
    name: str = "m",
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m memserve.runner`` on ``launch`` (written to ``folder/NAME.plan.json``, its stderr to
    ``folder/NAME.log``), ready on a free port: yield the process and its base URL (no ``/v1``); stopped on the
    way out. ``threads`` sets ``OMP_NUM_THREADS``; ``env`` adds to the environment."""
    plan_file, log = folder / f"{name}.plan.json", folder / f"{name}.log"
    plan_file.write_text(json.dumps(launch.to_json()))
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
    command = [sys.executable, "-m", "memserve.runner", "--plan", str(plan_file), "--port", str(port), "--name", name]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stderr=stderr, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the runner exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the runner was not ready in {READY_SECONDS} s; its log: {log}")
            time.sleep(0.2)
        yield process, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PeakRss:
    """Samples a process tree's RSS at 20 Hz in a thread, as the gateway's watchdog counts it (a forked copy
    that has not exec'd yet is left out: its pages are its parent's); ``peak_bytes`` is the largest sum seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_bytes, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
                total = sum(p.memory_info().rss for p in tree if p is root or not forked_not_exec(p.pid))
                self.peak_bytes = max(self.peak_bytes, total)
            except psutil.NoSuchProcess:
                return
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes
