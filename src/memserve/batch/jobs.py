"""Detached batch runs (``memserve batch run --detach``), recorded so another terminal can find them.

Each detached run is one JSON file, ``<data_dir>/batches/<id>.json``: its pid and that process's start time
(a later process given the same pid is not it), the command, and the paths of its input, output, errors,
progress file and log. The run itself writes only its output files and the progress file next to the output
(``OUT.jsonl.progress.json``), so ``batch status OUT.jsonl`` works for a run started in the foreground too.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from memserve.batch.checkpoint import count_lines, lock_holder, progress_path_for
from memserve.errors import ModelNotFound

_SAME_START_SECONDS = 0.01


@dataclass(frozen=True)
class JobRecord:
    """What ``batch list``, ``status`` and ``stop`` know of one detached run."""

    id: str
    pid: int
    started: float  # the process's create_time, to tell it from a later process with the same pid
    command: list[str]
    input: str
    output: str
    errors: str
    progress: str
    log: str

    def alive(self) -> bool:
        """Whether the run's own process is still running."""
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.started) < _SAME_START_SECONDS and process.status() not in (
                psutil.STATUS_ZOMBIE,
                psutil.STATUS_DEAD,
            )
        except psutil.Error:
            return False


def jobs_dir(data_dir: Path) -> Path:
    return data_dir / "batches"


def new_job_id() -> str:
    return f"batch_{secrets.token_hex(6)}"


def save_job(data_dir: Path, record: JobRecord) -> Path:
    path = jobs_dir(data_dir) / f"{record.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2))
    os.replace(temporary, path)
    return path


def list_jobs(data_dir: Path) -> list[JobRecord]:
    """Every recorded detached run, oldest first (unreadable records skipped)."""
    records = []
    folder = jobs_dir(data_dir)
    for path in sorted(folder.glob("batch_*.json")) if folder.is_dir() else []:
        try:
            records.append(JobRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(records, key=lambda record: record.started)


def find_job(data_dir: Path, job_id: str) -> JobRecord:
    for record in list_jobs(data_dir):
        if record.id == job_id:
            return record
    raise ModelNotFound(
        f"no detached batch {job_id!r} is recorded in {jobs_dir(data_dir)}; `memserve batch list` shows them",
        code="batch_not_found",
    )


def read_progress(output: Path) -> dict[str, Any] | None:
    """The progress a run last wrote for ``output`` (None if it never wrote one)."""
    try:
        data = json.loads(progress_path_for(output).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_progress(output: Path, data: dict[str, Any]) -> None:
    """Replace the progress file whole (readers never see half of one)."""
    path = progress_path_for(output)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def status_of(output: Path, errors: Path) -> dict[str, Any]:
    """Where the run writing ``output`` stands: its last progress, the lines on disk now, and who runs it."""
    progress = read_progress(output) or {}
    holder = lock_holder(output)
    succeeded, failed = count_lines(output), count_lines(errors)
    last = progress.get("state")
    if holder is not None:
        state = "running"
    elif last == "running":
        state = "killed"  # it said running and then died without a word (kill -9): the lock went with it
    else:
        state = last or ("stopped" if output.exists() else "not started")
    return {
        **progress,
        "state": state,
        "pid": holder,
        "output": str(output),
        "errors": str(errors),
        "succeeded_lines": succeeded,
        "failed_lines": failed,
        "done": succeeded + failed,
    }


def stop_job(record: JobRecord, *, wait_seconds: float = 10.0) -> bool:
    """SIGTERM the run (it stops cleanly: what is written stays, the same command resumes); True once it ended."""
    if not record.alive():
        return True
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if not record.alive():
            return True
        time.sleep(0.05)
    return False


__all__ = [
    "JobRecord",
    "find_job",
    "jobs_dir",
    "list_jobs",
    "new_job_id",
    "read_progress",
    "save_job",
    "status_of",
    "stop_job",
    "write_progress",
]
