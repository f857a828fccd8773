"""Load one model by its Plan, fault its weights in and warm it up, reporting each phase.

transformers 5 maps safetensors lazily on CPU: right after ``from_pretrained`` the process looks
tiny and grows on the first forward. A runner therefore reads every weight page and runs one
warm-up forward before it reports ready, so the memory it reports then is the memory it uses.

Phases (each reported on stderr, ``{"event": "phase", ...}``, and kept for /health):
``resolve`` (find the files), ``map`` (``from_pretrained``), ``fault_in`` (read every weight),
``warm_up`` (one forward), ``worst_case`` (the heaviest work the plan admits, measured against the
reservation; see ``runner/serve.py``).

Each phase is a :class:`~memserve.wire.events.PhaseDone` record; where it goes (JSON lines for the
gateway's pipe, a rich display for a person's terminal) is ``runner/progress.py``'s business.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument, MemserveError
from memserve.memory.planner import Plan
from memserve.runner.progress import LoadProgress
from memserve.wire.events import PhaseDone

PHASES = ("resolve", "map", "fault_in", "warm_up")  # load_model's; the runner then runs WORST_CASE_PHASE
WORST_CASE_PHASE = "worst_case"


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


def from_pretrained_kwargs(plan: Plan) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan.dtype)}
    placed = set(plan.device_map.values())  # where weights go (a GPU plan's cpu entry is runtime)
    gpu_devices = sorted(d for d in placed if d.startswith("cuda:"))
    if plan.quantization != "none" and gpu_devices:
        if not torch.cuda.is_available():
            raise InvalidArgument(f"the plan asks for {plan.quantization} (bitsandbytes), which needs a CUDA GPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if plan.quantization == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
            )
        )
    if not gpu_devices:
        return kwargs  # plain CPU: keep the weights memory-mapped
    if len(gpu_devices) == 1 and "cpu" not in placed:
        kwargs["device_map"] = {"": gpu_devices[0]}
    else:
        # split: let accelerate place layers within the plan's per-device reservation
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {
            (int(d.split(":")[1]) if d.startswith("cuda:") else "cpu"): need.total_bytes
            for d, need in plan.devices.items()
        }
    return kwargs


def cpu_quantized(plan: Plan) -> bool:
    """Whether the plan quantizes on CPU (``cpu-int8``, ``cpu-4bit``): torch's kernels, ``runner/quantize.py``.

    The device map decides, not the rung's name: quantized weights with no GPU in the map are CPU weights."""
    return plan.quantization != "none" and not any(d.startswith("cuda:") for d in plan.device_map.values())


def load_model(source: str, plan: Plan, report: LoadReport, *, progress: LoadProgress | None = None) -> tuple[Any, Any]:
    """Model and tokenizer, loaded, faulted in and warmed up; each phase timed into ``report``.

    ``progress`` receives the phases (default: :meth:`LoadProgress.for_stderr`); a live display, if
    any, is stopped before this returns or raises.
    """
    progress = progress if progress is not None else LoadProgress.for_stderr()
    with progress:
        return _load(source, plan, report, progress)


def record_phase(
    report: LoadReport,
    progress: LoadProgress,
    name: str,
    started: float,
    *,
    peak_bytes: dict[str, int] | None = None,
    needs_bytes: dict[str, int] | None = None,
    **details: Any,
) -> None:
    """One finished phase: kept for /health and reported as an event with the memory now."""
    event = PhaseDone(name, round(time.perf_counter() - started, 4), process_memory(), peak_bytes, needs_bytes, details)
    report.phases.append({k: v for k, v in event.to_json().items() if k not in ("event", "memory")})
    progress.event(event)


def _load(source: str, plan: Plan, report: LoadReport, progress: LoadProgress) -> tuple[Any, Any]:
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

    kwargs = from_pretrained_kwargs(plan)
    with _library_progress_bars(enabled=not progress.display):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    phase("map", t, dtype=plan.dtype, quantization=plan.quantization)

    t = time.perf_counter()
    from memserve.runner.kernels import ENV_SWITCH as PACK_SWITCH
    from memserve.runner.kernels import pack_linear_weights

    progress.phase_started("fault_in", total_bytes=weight_bytes(model))
    quantized = None
    if cpu_quantized(plan):
        from memserve.runner.quantize import quantize_linears

        # reads each layer's Linear weight once, from the mapped file, and keeps only its quantized form
        quantized = quantize_linears(model, plan.quantization, on_bytes=lambda n: progress.bytes_read("fault_in", n))
    warm_up_ids = torch.tensor([[tokenizer.eos_token_id or 0] * 8], device=model.device)
    # packing reads each bf16 Linear weight whole (those a forward calls); the rest are read below
    packing = pack_linear_weights(
        model, probe=lambda: model(input_ids=warm_up_ids), on_bytes=lambda n: progress.bytes_read("fault_in", n)
    )
    report.linear = packing.to_json() | ({"quantized": quantized.to_json()} if quantized is not None else {})
    read_weights(model, progress)
    phase("fault_in", t, linear=report.linear)

    report.state = "warming"
    t = time.perf_counter()
    progress.phase_started("warm_up")
    with torch.inference_mode():
        try:
            model(input_ids=warm_up_ids)
        except Exception as exc:
            if packing.layers:
                raise MemserveError(
                    f"the warm-up forward failed after {packing.layers} Linear weights were packed "
                    f"for oneDNN ({type(exc).__name__}: {exc}); load it with "
                    f"{PACK_SWITCH}=0 to keep them as they are",
                    code="packed_forward_failed",
                ) from exc
            raise
    phase("warm_up", t)
    report.state = "ready"
    return model, tokenizer


def weight_bytes(model: Any) -> int:
    """The bytes of the model's floating-point weights on the CPU: what ``read_weights`` reads."""
    return sum(_nbytes(p) for p in _cpu_weights(model))


def read_weights(model: Any, progress: LoadProgress) -> None:
    """Read every page of the model's mapped CPU weights (the ``fault_in`` phase), each tensor's bytes reported."""
    import torch

    with torch.inference_mode():
        for p in _cpu_weights(model):
            p.sum()
            progress.bytes_read("fault_in", _nbytes(p))


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
