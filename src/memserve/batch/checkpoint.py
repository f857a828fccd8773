"""The output file is the checkpoint: exactly one line per finished ``custom_id``, whatever kills the run.

A result is one ``write`` of one whole line to a file opened for appending, then ``fsync``; nothing else
records progress. So after any ending (Ctrl-C, SIGTERM, ``kill -9``, a reboot) the files say exactly what
is done: on start the last line is repaired if it was cut short (truncated back to the last newline), the
``custom_id``s of both files are read (streamed: memory holds the set of ids, not the lines), and those
requests are skipped. A request whose line never reached the disk simply runs again; one whose line did is
never recomputed, so each id ends up in the output files once.

A failure is final only when it would fail again: a line in the errors file whose failure was transient (no
answer at all because the server was down, a 429, a 5xx but 501: ``format.is_transient``) is taken out of the
errors file when the checkpoint opens (``take_back_transient``), so the next run tries that request again.

Two runs appending to the same output would break that, so the checkpoint holds an exclusive ``flock`` on
``OUT.lock`` (the kernel drops it when the process dies, however it dies) and a second run refuses, naming
the first's pid. A write that fails for want of space is undone (the file is cut back to its last whole
line) and stops the run with :class:`OutputFull`; the same command resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from memserve.batch.format import dumps_line, is_transient
from memserve.errors import InvalidArgument, MemserveError

_READ_CHUNK_BYTES = 1 << 16
_LOCK_ATTEMPTS = 5


class BatchLocked(MemserveError):
    """Another ``memserve batch run`` holds this output file (its lock names the pid)."""

    status_code = 409
    error_type = "conflict_error"
    code = "batch_locked"


class OutputFull(MemserveError):
    """A result could not be written: the disk (or a quota) is full. The output stays whole and resumable."""

    status_code = 507
    error_type = "api_error"
    code = "output_full"


class OutputCorrupt(InvalidArgument):
    """A line before the last one of an output file is not a batch result: the file is not one memserve wrote."""

    code = "output_corrupt"


def errors_path_for(output: Path) -> Path:
    """The default errors file beside ``OUT.jsonl``: ``OUT.errors.jsonl``."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def lock_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def progress_path_for(output: Path) -> Path:
    """Where a run writes its progress (JSON, replaced whole about once a second) for ``batch status``."""
    return output.with_name(output.name + ".progress.json")


def repair_tail(path: Path) -> int:
    """Cut a half-written last line off ``path`` (everything after its last newline); the bytes removed.

    A killed writer can leave only the last line short: results are appended one whole line at a time.
    """
    if not path.exists():
        return 0
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _READ_CHUNK_BYTES)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        return size - end


def _transient(raw: bytes) -> bool:
    """Whether an errors-file line records a failure that may pass if retried (its status, or no answer at all)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return False  # not ours to judge: finished_ids says what is wrong with it
    if not isinstance(line, dict):
        return False
    response = line.get("response")
    status = response.get("status_code") if isinstance(response, dict) else None
    return is_transient(status if isinstance(status, int) else None)


def take_back_transient(path: Path) -> int:
    """Remove the lines of transient failures from the errors file ``path``, so that their requests run again;
    how many were removed.

    Streamed: the kept lines are copied to a new file beside it, synced, and renamed over it (a crash leaves the
    old file or the new, whole); nothing is rewritten when no line is transient.
    """
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        if not any(_transient(raw) for raw in handle):
            return 0
    fresh = path.with_name(path.name + ".retry")
    taken = 0
    with path.open("rb") as old, fresh.open("wb") as new:
        for raw in old:
            if raw.endswith(b"\n") and _transient(raw):
                taken += 1
            else:
                new.write(raw)
        new.flush()
        os.fsync(new.fileno())
    os.replace(fresh, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return taken


def finished_ids(path: Path) -> Iterator[str]:
    """The ``custom_id`` of each line of an output or errors file, streamed.

    A last line that does not parse (bytes a crash left, say zeros after a reboot) is cut off; any other
    line that does not parse raises :class:`OutputCorrupt`: the file is not one this checkpoint wrote.
    """
    if not path.exists():
        return
    with path.open("rb") as handle:
        offset = 0
        for raw in handle:
            try:
                custom_id = json.loads(raw)["custom_id"]
                if not isinstance(custom_id, str):
                    raise TypeError(custom_id)
            except (ValueError, KeyError, TypeError):
                if handle.read(1) == b"":  # the last line: damage from a crash
                    handle.close()
                    os.truncate(path, offset)
                    return
                raise OutputCorrupt(
                    f"{path} has a line at byte {offset} that is not a batch result; "
                    "give --output a new file, or move this one away"
                ) from None
            offset += len(raw)
            yield custom_id


@dataclass
class _Appender:
    """One output file held open for appending whole lines."""

    path: Path
    fd: int
    size: int  # bytes of whole lines: where a failed write is cut back to

    def append(self, line: bytes) -> None:
        try:
            view = memoryview(line)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            os.fsync(self.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputFull(
                    f"cannot write to {self.path}: the disk is full ({exc.strerror}); free some space and run "
                    "the same command again: finished results are kept and the rest resumes"
                ) from exc
            raise OutputFull(
                f"cannot write to {self.path}: {exc.strerror}; fix it and run the same command again to resume"
            ) from exc
        self.size += len(line)


class Checkpoint:
    """The output and errors files of one batch run, locked, repaired and read; results appended durably.

    Use it as a context manager: entering takes the lock (or raises :class:`BatchLocked`), repairs both files,
    takes the transient failures out of the errors file (:attr:`retrying` counts them: they run again) and reads
    the finished ids into :attr:`finished`; leaving releases the lock.
    """

    def __init__(self, output: Path, errors: Path | None = None) -> None:
        self.output = output
        self.errors = errors if errors is not None else errors_path_for(output)
        self.lock_path = lock_path_for(output)
        self.finished: set[str] = set()
        self.succeeded = 0  # lines in the output file when opened, then appended
        self.failed = 0  # lines in the errors file
        self.repaired_bytes = 0
        self.retrying = 0  # transient failures of an earlier run taken out of the errors file, to run again
        self._lock_fd: int | None = None
        self._out: _Appender | None = None
        self._err: _Appender | None = None

    def __enter__(self) -> Checkpoint:
        self._lock()
        try:
            for path in (self.output, self.errors):
                self.repaired_bytes += repair_tail(path)
            self.retrying = take_back_transient(self.errors)
            for custom_id in finished_ids(self.output):
                self.finished.add(custom_id)
                self.succeeded += 1
            for custom_id in finished_ids(self.errors):
                self.finished.add(custom_id)
                self.failed += 1
            self._out = self._open(self.output)
            self._err = self._open(self.errors)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def record(self, custom_id: str, line: dict[str, Any], *, failed: bool) -> None:
        """Append one result (an output line, or an errors-file line when ``failed``), on disk when this returns."""
        self.record_many([(custom_id, line, failed)])

    def record_many(self, results: list[tuple[str, dict[str, Any], bool]]) -> None:
        """Append several results, each ``(custom_id, line, failed)``: one write and one fsync per file.

        Whole lines only, so a write cut short leaves at most a cut last line, which the next open repairs;
        if a write fails, none of these results counts as done (their file is cut back to before them).
        """
        ids = [custom_id for custom_id, _, _ in results]
        repeated = [i for i in ids if i in self.finished] or [i for i in ids if ids.count(i) > 1]
        if repeated:
            raise AssertionError(f"custom_id {repeated[0]!r} was recorded twice")  # a bug in the caller, not input
        assert self._out is not None and self._err is not None, "record() outside `with Checkpoint(...)`"
        for appender, failed in ((self._out, False), (self._err, True)):
            lines = [dumps_line(line) for _, line, is_failed in results if is_failed is failed]
            if lines:
                appender.append(b"".join(lines))
        for custom_id, _, failed in results:
            self.finished.add(custom_id)
            if failed:
                self.failed += 1
            else:
                self.succeeded += 1

    def close(self) -> None:
        for appender in (self._out, self._err):
            if appender is not None:
                os.close(appender.fd)
        self._out = self._err = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (unlinking it would race a new run)
            self._lock_fd = None

    @staticmethod
    def _open(path: Path) -> _Appender:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not existed:  # a new file's name must survive a reboot too, not only its lines
            folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return _Appender(path, fd, os.fstat(fd).st_size)

    def _lock(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for attempt in range(_LOCK_ATTEMPTS):  # a `batch status` probing it without /proc/locks holds it for µs
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < _LOCK_ATTEMPTS:
                    time.sleep(0.02)
        else:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BatchLocked(
                f"another `memserve batch run` (pid {holder}) is writing {self.output}; wait for it or stop it "
                "(`memserve batch stop`), or give --output another file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd


def lock_holder(output: Path) -> int | None:
    """The pid of the run holding ``output``'s lock now, or None when no run holds it.

    Read from ``/proc/locks`` (the kernel's table) without touching the lock: probing it with a lock of our
    own, however briefly, could make a run starting at that instant refuse. Elsewhere, the probe.
    """
    path = lock_path_for(output)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"  # as the kernel prints it
    try:
        with open("/proc/locks") as table:
            rows = table.read().splitlines()
    except OSError:
        return _probe_holder(path)
    for row in rows:
        fields = row.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF"; a waiter's row reads "1: -> FLOCK ..."
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == where:
            return int(fields[4]) if fields[4].isdigit() else -1
    return None


def _probe_holder(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


def count_lines(path: Path) -> int:
    """Whole lines in a file (0 if it is missing), counted in chunks."""
    if not path.exists():
        return 0
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


__all__ = [
    "BatchLocked",
    "Checkpoint",
    "OutputCorrupt",
    "OutputFull",
    "count_lines",
    "errors_path_for",
    "finished_ids",
    "lock_holder",
    "lock_path_for",
    "progress_path_for",
    "repair_tail",
    "take_back_transient",
]
