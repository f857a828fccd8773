"""Load one model by its Plan, fault its weights in and warm it up, reporting each phase.

transformers 5 maps safetensors lazily on CPU: right after ``from_pretrained`` the process looks
tiny and grows on the first forward. A runner therefore reads every weight page and runs one
warm-up forward before it reports ready, so the memory it reports then is the memory it uses.

Phases (each reported as a JSON line on stderr, ``{"event": "phase", ...}``, and kept for /health):
``resolve`` (find the files), ``map`` (``from_pretrained``), ``fault_in`` (read every weight),
``warm_up`` (one forward), ``worst_case`` (the heaviest work the plan admits, measured against the
reservation; see ``runner/serve.py``).

Who reads stderr decides its form (:meth:`LoadProgress.for_stderr`). The gateway reads it through a
pipe and parses one JSON object per line, so a pipe always gets exactly those lines. A person who
starts a runner in a terminal gets a rich progress display instead (one row per phase: a spinner
while it runs, then its seconds and the resident memory; ``fault_in`` counts the bytes read) and a
short line for each later event; JSON lines written under a live display would garble it.
``MEMSERVE_PROGRESS=0`` (or ``false``/``off``/``no``) keeps a terminal on plain JSON lines;
``MEMSERVE_PROGRESS=json`` shows the display *and* the JSON lines above it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.spinner import Spinner
from rich.table import Column
from rich.text import Text

from memserve.errors import InvalidArgument, MemserveError
from memserve.units import format_bytes

PHASES = ("resolve", "map", "fault_in", "warm_up")  # load_model's; the runner then runs WORST_CASE_PHASE
WORST_CASE_PHASE = "worst_case"
PROGRESS_ENV = "MEMSERVE_PROGRESS"
_PROGRESS_OFF = frozenset({"0", "false", "off", "no"})


@dataclass
class LoadReport:
    """What happened while loading, for /health and the progress lines."""

    phases: list[dict[str, Any]] = field(default_factory=list)
    state: str = "starting"
    linear: dict[str, Any] = field(default_factory=dict)  # which Linear kernel serves (runner/kernels.py)
    # the worst-case warm-up against the reservation, and what the runner admits after it (runner/serve.py)
    plan_check: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "phases": self.phases, "linear": self.linear, "plan_check": self.plan_check}


class LoadProgress:
    """Where load and lifecycle events go: JSON lines for a program, a rich display for a person.

    ``json_lines`` writes each event as one JSON object per line on ``stream`` (``sys.stderr`` at
    the time of writing when None). ``console`` shows the phases as a live progress display while
    the object is entered (``with progress:``) and any other event as a short line. Tests build one
    directly; :meth:`for_stderr` decides for the real stderr.
    """

    def __init__(self, *, json_lines: bool = True, console: Console | None = None,
                 stream: TextIO | None = None) -> None:
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
                _StatusColumn(), _PhaseColumn(), _BytesBarColumn(), _BytesColumn(), _NoteColumn(), _SecondsColumn(),
                console=self.console, redirect_stdout=False, redirect_stderr=True,
            )
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
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
            self._rows[name] = self._live.add_task(name, total=total_bytes, sized=total_bytes is not None,
                                                   seconds=None, failed=False, note="")

    def bytes_read(self, name: str, n_bytes: int) -> None:
        if self._live is not None and name in self._rows:
            self._live.update(self._rows[name], advance=n_bytes)

    def event(self, event: dict[str, Any]) -> None:
        """Report one event: a JSON line, and/or a finished row or a short line for a person."""
        if self.json_lines:
            self._write_json(event)
        if self.console is None:
            return
        if event.get("event") == "phase" and self._live is not None:
            self._finish_row(event)
            return
        line = _human_line(event)
        if line is not None:
            self.console.print(line, highlight=False)

    def _write_json(self, event: dict[str, Any]) -> None:
        line = json.dumps(event)
        if self._live is not None and self.console is not None:
            self.console.out(line, highlight=False)  # above the live rows, unwrapped
            return
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def _finish_row(self, event: dict[str, Any]) -> None:
        assert self._live is not None
        name = str(event.get("phase"))
        if name not in self._rows:
            self.phase_started(name)
        row = self._rows[name]
        task = next(t for t in self._live.tasks if t.id == row)
        total = task.total if task.total is not None else 1
        self._live.update(row, total=total, completed=total, seconds=event.get("seconds"), note=_rss_text(event))
        if self._running == name:
            self._running = None


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _rss_text(event: dict[str, Any]) -> str:
    rss_bytes = event.get("memory", {}).get("cpu", {}).get("rss_bytes")
    return f"RSS {format_bytes(rss_bytes)}" if isinstance(rss_bytes, int) else ""


def _human_line(event: dict[str, Any]) -> Text | None:
    """One line a person can read at a glance; None where something else already told them."""
    kind = event.get("event")
    if kind == "failed":
        return None  # the CLI prints the error itself, and the display marked the phase that failed
    if kind == "ready":
        rss = _rss_text(event)
        return Text(f"ready: {event.get('model')} on the {event.get('engine')} engine" + (f", {rss}" if rss else ""),
                    style="green")
    if kind == "listening":
        where = event.get("socket") or f"http://127.0.0.1:{event.get('port')}"
        return Text(f"listening on {where}")
    if kind == "engine_fallback":
        return Text(f"engine fallback: serving with {event.get('engine')}: {event.get('reason')}", style="yellow")
    if kind == "phase":
        return Text(f"{event.get('phase')} done in {event.get('seconds')} s  {_rss_text(event)}".rstrip())
    details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "memory"))
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


def emit(event: dict[str, Any]) -> None:
    """One event on stderr: a JSON line for the gateway, a short line for a person at a terminal."""
    LoadProgress.for_stderr().event(event)


def _status() -> dict[str, int]:
    status: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
            status[key] = int(value.split()[0]) * 1024
    return status


def peak_rss_bytes() -> int:
    """The process's resident high-water mark (``VmHWM``: anonymous and file-backed pages together).

    Unlike ``ru_maxrss`` it can be reset (:func:`reset_peak_rss`), so a runner that shrank what it admits
    can report the peak of what it now runs rather than of what it gave up.
    """
    hwm = _status().get("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start ``VmHWM`` again from the current RSS (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_memory() -> dict[str, dict[str, int]]:
    """Measured memory per device: anonymous and file-backed (mapped weights) RSS kept apart."""
    status = _status()
    cpu = {
        "rss_bytes": status.get("VmRSS", 0),
        "anon_bytes": status.get("RssAnon", 0),
        "file_bytes": status.get("RssFile", 0) + status.get("RssShmem", 0),
        "peak_rss_bytes": status.get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    memory = {"cpu": cpu}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            memory[f"cuda:{i}"] = {
                "allocated_bytes": int(torch.cuda.memory_allocated(i)),
                "reserved_bytes": int(torch.cuda.memory_reserved(i)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(i)),
            }
    return memory


def read_plan_file(path: Path) -> tuple[str, dict[str, Any]]:
    """A plan file is ``memserve fit --json`` output: the model's source and the chosen plan."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"cannot read plan file {path}: {exc}; write one with memserve fit MODEL --json") \
            from exc
    plan = data.get("plan") if isinstance(data, dict) else None
    source = data.get("model", {}).get("source") if isinstance(data, dict) else None
    if not isinstance(plan, dict) or not isinstance(source, str):
        raise InvalidArgument(
            f"plan file {path} has no plan (nothing fit?) or no model source; "
            "expected the output of memserve fit MODEL --json with a plan"
        )
    return source, plan


def _from_pretrained_kwargs(plan: dict[str, Any]) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan["dtype"])}
    placed = set(plan.get("device_map", {}).values())  # where weights go (a GPU plan's cpu entry is runtime)
    gpu_devices = sorted(d for d in placed if d.startswith("cuda:"))
    if plan["quantization"] != "none":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"the plan asks for {plan['quantization']} (bitsandbytes), which needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if plan["quantization"] == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=kwargs["dtype"])
        )
    if not gpu_devices:
        return kwargs  # plain CPU: keep the weights memory-mapped
    if len(gpu_devices) == 1 and "cpu" not in placed:
        kwargs["device_map"] = {"": gpu_devices[0]}
    else:
        # split: let accelerate place layers within the plan's per-device reservation
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {
            (int(d.split(":")[1]) if d.startswith("cuda:") else "cpu"): need["total_bytes"]
            for d, need in plan["devices"].items()
        }
    return kwargs


def load_model(
    source: str, plan: dict[str, Any], report: LoadReport, *, progress: LoadProgress | None = None
) -> tuple[Any, Any]:
    """Model and tokenizer, loaded, faulted in and warmed up; each phase timed into ``report``.

    ``progress`` receives the phases (default: :meth:`LoadProgress.for_stderr`); a live display, if
    any, is stopped before this returns or raises.
    """
    progress = progress if progress is not None else LoadProgress.for_stderr()
    with progress:
        return _load(source, plan, report, progress)


def record_phase(report: LoadReport, progress: LoadProgress, name: str, started: float, **extra: Any) -> None:
    """One finished phase: kept for /health and reported as an event with the memory now."""
    record = {"phase": name, "seconds": round(time.perf_counter() - started, 4), **extra}
    report.phases.append(record)
    progress.event({"event": "phase", **record, "memory": process_memory()})


def _load(source: str, plan: dict[str, Any], report: LoadReport, progress: LoadProgress) -> tuple[Any, Any]:
    def phase(name: str, started: float, **extra: Any) -> None:
        record_phase(report, progress, name, started, **extra)

    report.state = "loading"
    t = time.perf_counter()
    progress.phase_started("resolve")
    from memserve.checkpoint.locate import locate

    located = locate(source)
    if located.path is None:
        raise InvalidArgument(f"{source} is not available locally; download it first (huggingface-cli download)")
    path = located.path
    phase("resolve", t, path=str(path))

    t = time.perf_counter()
    progress.phase_started("map")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _from_pretrained_kwargs(plan)
    with _library_progress_bars(enabled=not progress.display):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    phase("map", t, dtype=plan["dtype"], quantization=plan["quantization"])

    t = time.perf_counter()
    from memserve.runner.kernels import ENV_SWITCH as PACK_SWITCH
    from memserve.runner.kernels import pack_linear_weights

    total = sum(_nbytes(p) for p in _cpu_weights(model))
    progress.phase_started("fault_in", total_bytes=total)
    warm_up_ids = torch.tensor([[tokenizer.eos_token_id or 0] * 8], device=model.device)
    # packing reads each bf16 Linear weight whole (those a forward calls); the rest are read below
    packing = pack_linear_weights(model, probe=lambda: model(input_ids=warm_up_ids),
                                  on_bytes=lambda n: progress.bytes_read("fault_in", n))
    report.linear = packing.to_json()
    with torch.inference_mode():
        for p in _cpu_weights(model):
            p.sum()  # reads every page of the mapped weights
            progress.bytes_read("fault_in", _nbytes(p))
    phase("fault_in", t, linear=report.linear)

    report.state = "warming"
    t = time.perf_counter()
    progress.phase_started("warm_up")
    with torch.inference_mode():
        try:
            model(input_ids=warm_up_ids)
        except Exception as exc:
            if packing.layers:
                raise MemserveError(f"the warm-up forward failed after {packing.layers} Linear weights were packed "
                                   f"for oneDNN ({type(exc).__name__}: {exc}); load it with "
                                   f"{PACK_SWITCH}=0 to keep them as they are", code="packed_forward_failed") from exc
            raise
    phase("warm_up", t)
    report.state = "ready"
    return model, tokenizer


def _cpu_weights(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.device.type == "cpu" and p.is_floating_point()]


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


@contextmanager
def _library_progress_bars(*, enabled: bool) -> Iterator[None]:
    """transformers draws its own tqdm bar while loading; under our display it would only add noise."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()
