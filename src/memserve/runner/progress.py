"""Where a runner's start-up events go: JSON lines for a program, a rich progress display for a person.

Who reads stderr decides its form (:meth:`LoadProgress.for_stderr`). The gateway reads it through a
pipe and parses one JSON object per line (``wire/events.py``'s records), so a pipe always gets exactly
those lines. A person who starts a runner in a terminal gets a rich progress display instead (one row
per phase: a spinner while it runs, then its seconds and the resident memory; ``fault_in`` counts the
bytes read) and a short line for each later event; JSON lines written under a live display would garble
it. ``MEMSERVE_PROGRESS=0`` (or ``false``/``off``/``no``) keeps a terminal on plain JSON lines;
``MEMSERVE_PROGRESS=json`` shows the display *and* the JSON lines above it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.spinner import Spinner
from rich.table import Column
from rich.text import Text

from memserve.units import format_bytes
from memserve.wire.events import EngineFallback, Failed, Listening, Memory, PhaseDone, Ready, RunnerEvent

PROGRESS_ENV = "MEMSERVE_PROGRESS"
_PROGRESS_OFF = frozenset({"0", "false", "off", "no"})


class LoadProgress:
    """Where load and lifecycle events go: JSON lines for a program, a rich display for a person.

    ``json_lines`` writes each event as one JSON object per line on ``stream`` (``sys.stderr`` at
    the time of writing when None). ``console`` shows the phases as a live progress display while
    the object is entered (``with progress:``) and any other event as a short line. Tests build one
    directly; :meth:`for_stderr` decides for the real stderr.
    """

    def __init__(
        self, *, json_lines: bool = True, console: Console | None = None, stream: TextIO | None = None
    ) -> None:
        self.json_lines = json_lines
        self.console = console
        self._stream = stream
        self._live: Progress | None = None
        self._rows: dict[str, TaskID] = {}
        self._running: str | None = None

    @classmethod
    def for_stderr(cls, *, stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> LoadProgress:
        """JSON lines only unless ``stream`` (default: stderr) is a terminal and ``MEMSERVE_PROGRESS`` allows."""
        target = stream if stream is not None else sys.stderr
        setting = (os.environ if env is None else env).get(PROGRESS_ENV, "").strip().lower()
        if setting in _PROGRESS_OFF or not _is_terminal(target):
            return cls(json_lines=True, stream=stream)
        return cls(json_lines=setting == "json", console=Console(file=target), stream=stream)

    @property
    def display(self) -> bool:
        """Whether a person is watching: then library progress bars would only get in the way."""
        return self.console is not None

    def __enter__(self) -> LoadProgress:
        if self.console is not None and self._live is None:
            self._live = Progress(
                _StatusColumn(),
                _PhaseColumn(),
                _BytesBarColumn(),
                _BytesColumn(),
                _NoteColumn(),
                _SecondsColumn(),
                console=self.console,
                redirect_stdout=False,
                redirect_stderr=True,
            )
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        if exc_type is not None and self._running in self._rows:
            live.update(self._rows[self._running], failed=True, note="failed")
        live.stop()  # before the error is printed, so the terminal is whole again
        self._rows.clear()
        self._running = None

    def phase_started(self, name: str, *, total_bytes: int | None = None) -> None:
        """A row with a spinner; with ``total_bytes``, a bar counting :meth:`bytes_read` too."""
        self._running = name
        if self._live is not None:
            self._rows[name] = self._live.add_task(
                name, total=total_bytes, sized=total_bytes is not None, seconds=None, failed=False, note=""
            )

    def bytes_read(self, name: str, n_bytes: int) -> None:
        if self._live is not None and name in self._rows:
            self._live.update(self._rows[name], advance=n_bytes)

    def event(self, event: RunnerEvent) -> None:
        """Report one event: a JSON line, and/or a finished row or a short line for a person."""
        if self.json_lines:
            self._write_json(event)
        if self.console is None:
            return
        if isinstance(event, PhaseDone) and self._live is not None:
            self._finish_row(event)
            return
        line = _human_line(event)
        if line is not None:
            self.console.print(line, highlight=False)

    def _write_json(self, event: RunnerEvent) -> None:
        line = json.dumps(event.to_json())
        if self._live is not None and self.console is not None:
            self.console.out(line, highlight=False)  # above the live rows, unwrapped
            return
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def _finish_row(self, event: PhaseDone) -> None:
        assert self._live is not None
        name = event.phase
        if name not in self._rows:
            self.phase_started(name)
        row = self._rows[name]
        task = next(t for t in self._live.tasks if t.id == row)
        total = task.total if task.total is not None else 1
        self._live.update(row, total=total, completed=total, seconds=event.seconds, note=_rss_text(event.memory))
        if self._running == name:
            self._running = None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _rss_text(memory: Memory) -> str:
    rss_bytes = memory.get("cpu", {}).get("rss_bytes")
    return f"RSS {format_bytes(rss_bytes)}" if isinstance(rss_bytes, int) else ""


def _human_line(event: RunnerEvent) -> Text | None:
    """One line a person can read at a glance; None where something else already told them."""
    if isinstance(event, Failed):
        return None  # the CLI prints the error itself, and the display marked the phase that failed
    if isinstance(event, Ready):
        rss = _rss_text(event.memory)
        return Text(f"ready: {event.model} on the {event.engine} engine" + (f", {rss}" if rss else ""), style="green")
    if isinstance(event, Listening):
        return Text(f"listening on {event.socket or f'http://127.0.0.1:{event.port}'}")
    if isinstance(event, EngineFallback):
        return Text(f"engine fallback: serving with {event.engine}: {event.reason}", style="yellow")
    if isinstance(event, PhaseDone):
        return Text(f"{event.phase} done in {event.seconds:g} s  {_rss_text(event.memory)}".rstrip())
    fields = event.to_json()
    kind = fields.pop("event")
    details = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "memory")
    return Text(f"{kind}: {details}" if details else str(kind))


class _Column(ProgressColumn):
    """A column that keeps its cells on one line: a row fits in 80 columns."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))


class _StatusColumn(_Column):
    """A spinner while a phase runs, ✓ once it is done, ✗ if the load failed in it."""

    def __init__(self) -> None:
        super().__init__()
        self._spinner = Spinner("dots", style="progress.spinner")

    def render(self, task: Task) -> RenderableType:
        if task.fields.get("failed"):
            return Text("✗", style="bold red")
        if task.finished:
            return Text("✓", style="green")
        return self._spinner.render(task.get_time())


class _PhaseColumn(_Column):
    def render(self, task: Task) -> RenderableType:
        return Text(task.description, style="bold")


class _BytesBarColumn(_Column):
    """A bar only for a phase that knows its size in bytes (``fault_in``)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=20)

    def render(self, task: Task) -> RenderableType:
        return self._bar.render(task) if task.fields.get("sized") else Text("")


class _BytesColumn(_Column):
    """Bytes read of the total while ``fault_in`` runs, the total once it is done."""

    def render(self, task: Task) -> RenderableType:
        if not task.fields.get("sized"):
            return Text("")
        if task.finished:
            return Text(f"{format_bytes(task.completed)} read")
        return Text(f"{format_bytes(task.completed)} / {format_bytes(task.total or 0)}")


class _NoteColumn(_Column):
    """The resident memory after a phase, or that the load failed in it."""

    def render(self, task: Task) -> RenderableType:
        return Text(str(task.fields.get("note", "")), style="bold red" if task.fields.get("failed") else "dim")


class _SecondsColumn(_Column):
    """The phase's measured seconds once done; the time so far while it runs."""

    def render(self, task: Task) -> RenderableType:
        seconds = task.fields.get("seconds")
        if not isinstance(seconds, (int, float)):
            seconds = task.elapsed or 0.0
        return Text(f"{seconds:.2f} s", style="progress.elapsed")


def emit(event: RunnerEvent) -> None:
    """One event on stderr: a JSON line for the gateway, a short line for a person at a terminal."""
    LoadProgress.for_stderr().event(event)
