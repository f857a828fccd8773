"""Load one model by its Plan, fault its weights in and warm it up, reporting each phase.

transformers 5 maps safetensors lazily on CPU: right after ``from_pretrained`` the process looks
tiny and grows on the first forward. A runner therefore reads every weight page and runs one
warm-up forward before it reports ready, so the memory it reports then is the memory it uses.

Phases (each reported as a JSON line on stderr, ``{"event": "phase", ...}``, and kept for /health):
``resolve`` (find the files), ``map`` (``from_pretrained``), ``fault_in`` (read every weight),
``warm_up`` (one forward).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memserve.errors import InvalidArgument

PHASES = ("resolve", "map", "fault_in", "warm_up")


@dataclass
class LoadReport:
    """What happened while loading, for /health and the progress lines."""

    phases: list[dict[str, Any]] = field(default_factory=list)
    state: str = "starting"

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "phases": self.phases}


def emit(event: dict[str, Any]) -> None:
    """One structured line on stderr: the gateway (and a person) read loads from these."""
    sys.stderr.write(json.dumps(event) + "\n")
    sys.stderr.flush()


def process_memory() -> dict[str, dict[str, int]]:
    """Measured memory per device: anonymous and file-backed (mapped weights) RSS kept apart."""
    status: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
            status[key] = int(value.split()[0]) * 1024
    cpu = {
        "rss_bytes": status.get("VmRSS", 0),
        "anon_bytes": status.get("RssAnon", 0),
        "file_bytes": status.get("RssFile", 0) + status.get("RssShmem", 0),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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
    source: str, plan: dict[str, Any], report: LoadReport, *, on_phase: Callable[[dict[str, Any]], None] = emit
) -> tuple[Any, Any]:
    """Model and tokenizer, loaded, faulted in and warmed up; each phase timed into ``report``."""

    def phase(name: str, started: float, **extra: Any) -> None:
        record = {"phase": name, "seconds": round(time.perf_counter() - started, 4), **extra}
        report.phases.append(record)
        on_phase({"event": "phase", **record, "memory": process_memory()})

    report.state = "loading"
    t = time.perf_counter()
    from memserve.checkpoint.locate import locate

    located = locate(source)
    if located.path is None:
        raise InvalidArgument(f"{source} is not available locally; download it first (huggingface-cli download)")
    path = located.path
    phase("resolve", t, path=str(path))

    t = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _from_pretrained_kwargs(plan)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    phase("map", t, dtype=plan["dtype"], quantization=plan["quantization"])

    t = time.perf_counter()
    with torch.inference_mode():
        for p in model.parameters():
            if p.device.type == "cpu" and p.is_floating_point():
                p.sum()  # reads every page of the mapped weights
    phase("fault_in", t)

    report.state = "warming"
    t = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor([[tokenizer.eos_token_id or 0] * 8], device=model.device)
        model(input_ids=ids)
    phase("warm_up", t)
    report.state = "ready"
    return model, tokenizer
