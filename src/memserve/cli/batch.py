"""``memserve batch run|status|stop|list``: OpenAI batch files run to the end, however often they are stopped.

``run`` sends every line of INPUT to a server (``--url``) or to a runner it starts itself (``--local``), and
appends each result to ``--output`` (and failures to ``OUT.errors.jsonl``) the moment it arrives: the output
is the checkpoint, so the same command after Ctrl-C, SIGTERM or ``kill -9`` goes on where it stopped.
``--detach`` runs it in the background, recorded under ``<data_dir>/batches``; ``status``, ``stop`` and
``list`` find it from any terminal. Exit codes: 0 when every request has a line (some may be in the errors
file), 1 for an error, 3 when a ``--local`` model cannot fit, 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from memserve.batch.checkpoint import BatchLocked, errors_path_for, lock_holder
from memserve.batch.execute import Progress
from memserve.batch.jobs import (
    JobRecord,
    find_job,
    list_jobs,
    new_job_id,
    read_progress,
    save_job,
    status_of,
    stop_job,
)
from memserve.batch.run import BatchRun, RunView, count_requests, execute
from memserve.errors import EXIT_NO_FIT, InsufficientMemory, InvalidArgument
from memserve.units import format_bytes

LIVE_UPDATE_SECONDS = 0.1  # rich's default refresh: 10 times a second
PLAIN_REPORT_SECONDS = 5.0
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _data_dir() -> Path:
    from memserve.config import load_settings

    return load_settings().data_dir


@click.group("batch")
def batch() -> None:
    """Run OpenAI batch files (.jsonl) to the end, resumably; watch and stop background runs."""


@batch.command("run")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Results, one line per request; also the checkpoint the same command resumes from.",
)
@click.option(
    "--errors",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Failed requests [default: OUT.errors.jsonl beside --output].",
)
@click.option("--model", default=None, help="Send every request to this model (replaces each body's model).")
@click.option("--url", default=None, help="An OpenAI-compatible server, e.g. http://127.0.0.1:8000 (a gateway).")
@click.option(
    "--local",
    "local",
    metavar="MODEL_SOURCE",
    default=None,
    help="Start a runner for this model (a folder or hub id), planned as run-model plans it.",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Requests in flight.")
@click.option(
    "--max-retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries of a transient failure (429, 5xx, no answer) before it goes to the errors file.",
)
@click.option("--api-key", envvar="MEMSERVE_API_KEY", default=None, help="Key for --url [default: $MEMSERVE_API_KEY].")
@click.option("--context", type=click.IntRange(min=1), default=None, help="With --local: tokens per sequence.")
@click.option("--memory", default=None, help="With --local: budget per device, e.g. cpu=8GiB.")
@click.option("--headroom", default=None, help="With --local: never hand out this much per device.")
@click.option("--detach", is_flag=True, help="Run in the background; prints the id for batch status/stop.")
@click.option("--job-id", hidden=True, default=None)
def run(input_path: Path, output: Path, detach: bool, job_id: str | None, **options: Any) -> None:
    """Send every request of INPUT (OpenAI's batch .jsonl) and write each result to --output, resumably."""
    config = BatchRun(
        input=input_path,
        output=output,
        errors=options["errors"],
        model=options["model"],
        url=options["url"],
        local=options["local"],
        concurrency=options["concurrency"],
        max_retries=options["max_retries"],
        api_key=options["api_key"],
        context=options["context"],
        memory=options["memory"],
        headroom=options["headroom"],
        job_id=job_id,
    )
    if (config.url is None) == (config.local is None):
        raise click.UsageError("give --url (a server to send to) or --local (a model to start), one of them")
    if config.local is None and any(options[name] for name in ("context", "memory", "headroom")):
        raise click.UsageError("--context, --memory and --headroom apply to --local only")
    if detach:
        _detach(config, options)
        return
    _run_foreground(config)


def _run_foreground(config: BatchRun) -> None:
    console = Console(stderr=True)
    display = LiveDisplay(console) if console.is_terminal else PlainDisplay()

    async def main() -> Progress:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await execute(config, on_progress=display.update, on_note=display.note)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    display.start()
    try:
        final = asyncio.run(main())
    except InsufficientMemory as exc:
        display.stop()
        click.echo(f"no fit: {exc.message}", err=True)
        sys.exit(EXIT_NO_FIT)
    except KeyboardInterrupt:
        display.stop()
        click.echo(f"interrupted: finished results are in {config.output}; run the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except asyncio.CancelledError:
        display.stop()
        click.echo(
            f"stopped (SIGTERM): finished results are in {config.output}; run the same command to resume", err=True
        )
        sys.exit(EXIT_TERMINATED)
    finally:
        display.stop()
    click.echo(
        f"done: {final.done} of {final.total} requests ({final.succeeded} now, {final.done_before} before"
        + (f", {final.retrying_earlier} retried from the last run's errors" if final.retrying_earlier else "")
        + f"); {final.failed} failed this run; {final.completion_tokens} tokens out; results in {config.output}"
        + (f", failures in {config.errors_path}" if final.failed else ""),
        err=True,
    )


def _detach(config: BatchRun, options: dict[str, Any]) -> None:
    """Check what can be checked here (the input, the lock), then start the same run in its own session."""
    count_requests(config.input, model=config.model if config.local is None else "local")
    holder = lock_holder(config.output)
    if holder is not None:
        raise BatchLocked(f"another `memserve batch run` (pid {holder}) is writing {config.output}; wait or stop it")
    data_dir = _data_dir()
    job_id = new_job_id()
    log = data_dir / "batches" / f"{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "memserve",
        "batch",
        "run",
        str(config.input.resolve()),
        "--output",
        str(config.output.resolve()),
        "--errors",
        str(config.errors_path.resolve()),
        "--concurrency",
        str(config.concurrency),
        "--max-retries",
        str(config.max_retries),
        "--job-id",
        job_id,
    ]
    for name in ("model", "url", "local", "context", "memory", "headroom"):
        if options[name] is not None:
            argv += [f"--{name}", str(options[name])]
    env = dict(os.environ)
    if config.api_key:
        env["MEMSERVE_API_KEY"] = config.api_key  # not on the command line, where `ps` shows it
    # posix_spawn, not Popen: nothing here waits for the run, and a Popen left running warns when collected
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = time.time()
    record = JobRecord(
        id=job_id,
        pid=pid,
        started=started,
        command=argv[2:],
        input=str(config.input.resolve()),
        output=str(config.output.resolve()),
        errors=str(config.errors_path.resolve()),
        progress=str(config.output.resolve()) + ".progress.json",
        log=str(log),
    )
    save_job(data_dir, record)
    click.echo(job_id)
    click.echo(f"started {job_id} (pid {pid}); `memserve batch status {job_id}` to watch, log in {log}", err=True)


class PlainDisplay:
    """Lines on stderr when it is not a terminal: notes as they come, progress every few seconds."""

    def __init__(self) -> None:
        self._last = 0.0
        self._finished = False

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def note(self, text: str) -> None:
        click.echo(text, err=True)

    def update(self, progress: Progress, view: RunView) -> None:
        now = time.monotonic()
        finished = progress.done >= progress.total
        if self._finished or (now - self._last < PLAIN_REPORT_SECONDS and not finished):
            return
        self._last, self._finished = now, finished
        click.echo(progress_line(progress, view), err=True)


class LiveDisplay:
    """A rich progress bar: done/total, rate, ETA, tokens/s, errors, and the runner's memory with --local."""

    def __init__(self, console: Console, label: str = "batch") -> None:
        self.bar = RichProgress(
            TextColumn(label.replace("{", "{{").replace("}", "}}"), markup=False),  # a format string: braces doubled
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self._last = 0.0

    def start(self) -> None:
        self.bar.start()

    def stop(self) -> None:
        self.bar.stop()

    def note(self, text: str) -> None:
        self.bar.console.print(text, highlight=False)

    def update(self, progress: Progress, view: RunView) -> None:
        now = time.monotonic()
        if self.task is None:
            self.task = self.bar.add_task("batch", total=progress.total, completed=progress.done, info="")
        elif now - self._last < LIVE_UPDATE_SECONDS and progress.done < progress.total:
            return  # the bar redraws 10 times a second: a request finishing sooner would only cost CPU
        self._last = now
        self.bar.update(self.task, completed=progress.done, info=_rates(progress, view))


def _rates(progress: Progress, view: RunView) -> str:
    elapsed = max(time.time() - progress.started_at, 1e-9)
    parts = [
        f"{(progress.succeeded + progress.failed) / elapsed:.1f} req/s",
        f"{progress.completion_tokens / elapsed:.0f} tok/s",
        f"{progress.failed} failed",
        f"{progress.retries} retries",
    ]
    if view.memory_bytes is not None:
        now = view.memory_bytes()
        peak = view.peak_memory_bytes() if view.peak_memory_bytes else now
        parts.append(f"runner {format_bytes(now)} (peak {format_bytes(peak)})" if now else "runner stopped")
    return " · ".join(parts)


def progress_line(progress: Progress, view: RunView) -> str:
    percent = 100 * progress.done / progress.total if progress.total else 100.0
    elapsed = max(time.time() - progress.started_at, 1e-9)
    rate = (progress.succeeded + progress.failed) / elapsed
    left = progress.total - progress.done
    eta = f", ETA {left / rate:.0f} s" if rate > 0 and left else ""
    return f"batch: {progress.done}/{progress.total} ({percent:.0f}%){eta} · {_rates(progress, view)}"


def _resolve(target: str | None) -> tuple[JobRecord | None, Path, Path]:
    """A job id, an output path, or nothing (the latest detached run) → (record, output, errors)."""
    if target is None:
        records = list_jobs(_data_dir())
        if not records:
            raise InvalidArgument(
                "no detached batch is recorded; give the output file: memserve batch status OUT.jsonl"
            )
        record = records[-1]
    elif target.startswith("batch_") and not Path(target).exists():
        record = find_job(_data_dir(), target)
    else:
        output = Path(target)
        progress = read_progress(output) or {}
        errors = Path(progress["errors"]) if progress.get("errors") else errors_path_for(output)
        return None, output, errors
    return record, Path(record.output), Path(record.errors)


@batch.command("status")
@click.argument("target", metavar="[ID|OUT]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(target: str | None, as_json: bool) -> None:
    """Where a batch stands: a detached run's ID, an output file, or the latest detached run."""
    record, output, errors = _resolve(target)
    data = status_of(output, errors)
    if record is not None:
        data = {**data, "job_id": record.id, "log": record.log}
        if data["state"] == "running" and not record.alive():
            data["state"] = "killed"
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    total = data.get("total")
    rows = [
        ("batch", str(data.get("job_id") or output)),
        ("state", str(data["state"])),
        ("done", f"{data['done']}" + (f" of {total}" if total else "")),
        ("failed", str(data["failed_lines"])),
        ("pid", str(data["pid"] or "-")),
        ("tokens out", str(data.get("completion_tokens", "-"))),
        ("output", str(output)),
        ("errors", str(errors)),
    ]
    if data.get("runner_memory_bytes"):
        rows.append(("runner memory", format_bytes(data["runner_memory_bytes"])))
    if data.get("runner_peak_memory_bytes"):
        rows.append(("runner peak", format_bytes(data["runner_peak_memory_bytes"])))
    if data.get("last_error"):
        rows.append(("last error", str(data["last_error"])))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


@batch.command("stop")
@click.argument("target", metavar="ID|OUT")
def stop(target: str) -> None:
    """Stop a batch cleanly (SIGTERM): what is written stays, and the same run command resumes it."""
    record, output, _ = _resolve(target)
    if record is None:
        pid = lock_holder(output)
        if pid is None or pid < 0:
            raise InvalidArgument(f"no batch run is writing {output} now")
        os.kill(pid, signal.SIGTERM)
        click.echo(f"sent SIGTERM to pid {pid}", err=True)
        return
    if stop_job(record):
        click.echo(f"stopped {record.id}; resume it with: {shlex.join(record.command)}", err=True)
    else:
        raise InvalidArgument(f"{record.id} (pid {record.pid}) did not stop within 10 s; try again or kill -9 it")


@batch.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def list_(as_json: bool) -> None:
    """Detached batch runs recorded under the data dir, with their state and progress."""
    rows = []
    for record in list_jobs(_data_dir()):
        data = status_of(Path(record.output), Path(record.errors))
        state = data["state"] if record.alive() or data["state"] != "running" else "killed"
        rows.append(
            {
                "id": record.id,
                "state": state,
                "done": data["done"],
                "total": data.get("total"),
                "failed": data["failed_lines"],
                "pid": record.pid,
                "output": record.output,
                "started": record.started,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no detached batch runs", err=True)
        return
    table = Table("id", "state", "done", "failed", "pid", "started", "output")
    for row in rows:
        done = f"{row['done']}/{row['total']}" if row["total"] else str(row["done"])
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["started"]))
        table.add_row(row["id"], row["state"], done, str(row["failed"]), str(row["pid"]), started, row["output"])
    Console().print(table)


__all__ = ["batch"]
