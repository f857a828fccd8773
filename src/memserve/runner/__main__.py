"""``python -m memserve.runner --plan PLAN.json (--socket PATH | --port P)``: one model, one process.

With ``--parent-pid`` (the gateway passes its own pid) the runner lives no longer than its gateway, however
the gateway died (``kill -9`` included): nobody else will ever send it a request or stop it, and it holds
a model's worth of memory. Two watchers, whichever sees it first, remove the runner's socket and plan file
and end the process:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGHUP)``: the kernel signals the runner the moment its parent goes.
  The kernel sends it when the parent *thread* that started the runner ends, too (a gateway that spawned
  from a thread that later finished, as tests do), so the handler acts only when the parent process is
  really gone (``os.getppid()`` is no longer the gateway's pid). SIGHUP is what it means: the other end
  hung up; uvicorn leaves it alone, and a runner has no terminal to send it.
- everywhere, a daemon thread that polls ``os.getppid()`` every ``PARENT_POLL_SECONDS``: where prctl is
  missing, and for a gateway that died before prctl ran (then the runner has been reparented already).

There is nothing to drain once the gateway is gone (its connections died with it), so the runner exits at
once with ``os._exit``: the kernel frees its memory, and no engine thread can hold the exit up.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import click

from memserve.errors import MemserveError

PARENT_POLL_SECONDS = 0.25
"""How often the fallback watcher asks whether the gateway is still there: exit well within a second."""

PARENT_GONE_SIGNAL = signal.SIGHUP
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` when the parent goes; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's prctl among them
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def leave_now(paths: Sequence[Path]) -> None:
    """Remove the runner's files and end the process, without waiting for anything."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    os._exit(0)


def watch_parent(
    parent_pid: int,
    on_gone: Callable[[], None],
    *,
    death_signal: bool = True,
    poll_seconds: float = PARENT_POLL_SECONDS,
) -> None:
    """Call ``on_gone`` (once, it is expected not to return) as soon as process ``parent_pid`` is no longer
    this process's parent. Call from the main thread: the death signal's handler is installed here."""
    lock = threading.Lock()

    def gone() -> None:
        if lock.acquire(blocking=False):  # the signal and the thread may both see it; one acts
            on_gone()

    if death_signal:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if os.getppid() != parent_pid:  # not merely the spawning thread of a living gateway ending
                gone()

        signal.signal(PARENT_GONE_SIGNAL, on_signal)
        set_parent_death_signal(PARENT_GONE_SIGNAL)

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        gone()

    # started after prctl: a parent that died before prctl took effect is seen by the first poll
    threading.Thread(target=poll, name="memserve-parent-watch", daemon=True).start()


@click.command()
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="A plan file: the output of memserve fit MODEL --json.",
)
@click.option("--socket", type=click.Path(path_type=Path), default=None, help="Listen on this Unix socket.")
@click.option("--port", type=int, default=None, help="Listen on 127.0.0.1:PORT.")
@click.option("--name", default=None, help="The model name clients use (default: the folder name).")
@click.option(
    "--max-queue",
    type=int,
    default=None,
    help="Waiting requests beyond the plan's concurrency (default: the plan file's, else 4 per sequence).",
)
@click.option(
    "--parent-pid",
    type=int,
    default=None,
    help="Exit, removing the socket and the plan file, as soon as this process (the gateway) is gone.",
)
def main(
    plan_path: Path,
    socket: Path | None,
    port: int | None,
    name: str | None,
    max_queue: int | None,
    parent_pid: int | None,
) -> None:
    """Load one model by its plan and serve it (OpenAI-compatible) until stopped."""
    if parent_pid is not None:  # first, before the imports that take a while
        owned = [plan_path, *([socket] if socket is not None else [])]
        watch_parent(parent_pid, lambda: leave_now(owned))
    from memserve.memory.fit import PlanFile
    from memserve.runner.progress import emit
    from memserve.runner.serve import serve
    from memserve.wire.events import Failed

    if (socket is None) == (port is None):
        raise click.UsageError("pass exactly one of --socket PATH or --port P")
    try:
        launch = PlanFile.read(plan_path)
        if max_queue is not None:
            launch = dataclasses.replace(launch, max_queue=max_queue)
        serve(launch, name=name, port=port, socket=socket)
    except MemserveError as exc:
        emit(Failed(exc.message))
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
