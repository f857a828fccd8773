"""The ladder: choose the first placement and quantization that fits, or say plainly what would.

``plan(facts, request, inventory, policy)`` is a pure function. Rungs, first that fits wins:

1. ``gpu``            every GPU, checkpoint dtype (fp32 checkpoints run in bf16, or fp16 without bf16)
2. ``gpu-int8``       every GPU, bitsandbytes int8
3. ``gpu-4bit``       every GPU, bitsandbytes nf4
4. ``gpu-cpu-split``  GPUs first, the remaining layers in host RAM (accelerate offload)
5. ``cpu``            host RAM; bf16 and fp32 checkpoints as stored, fp16 ones in bf16
6. ``cpu-int8``       host RAM, the layers' Linear weights int8 (torch's own CPU kernel, no bitsandbytes)
7. ``cpu-4bit``       host RAM, the layers' Linear weights 4-bit in groups of 32 (torch's own CPU kernel)
8. ``smaller-context`` the first of those that fits with the largest context at or above
                      ``request.min_context_tokens`` (by default the requested context: never chosen
                      unless the caller allows a smaller one)

A rung is *available* when the host has its devices, the installed software supports it and the
request allows it; an unavailable rung is still priced, so that a NoFit can say "fits with 4-bit".
Layers are packed in order across the rung's devices the way accelerate's device maps are; each
device that holds layers also holds their KV cache, the activations and a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from memserve.checkpoint.facts import CheckpointFacts
from memserve.errors import InvalidArgument
from memserve.memory.estimate import (
    CONTINUOUS_BATCHING,
    CPU_GENERATE_RUNTIME_BYTES,
    CPU_INT4_GROUP_SIZE,
    CPU_RUNTIME_BYTES,
    GPU_HOST_RUNTIME_BYTES,
    GPU_RUNTIME_BYTES,
    IMAGE_TEXT,
    DeviceNeed,
    Engine,
    Quantization,
    activation_bytes,
    batch_tokens_for,
    block_weight_bytes,
    kv_cache_bytes,
)
from memserve.memory.inventory import Device, Inventory
from memserve.memory.vision import image_cost
from memserve.units import format_bytes
from memserve.wire.images import ImageLimits

if TYPE_CHECKING:  # only its two fields are read here, so the module is not imported
    from memserve.checkpoint.gguf import GgufFacts

QuantizationRequest = Literal["auto", "none", "int8", "4bit"]
# the engine a plan runs on, i.e. its runner kind: memserve's own runner (transformers) or an external
# OpenAI-compatible server memserve starts and supervises (docs/engines.md)
RunnerKind = Literal["transformers", "vllm", "llama.cpp"]
RUNNER_KINDS: tuple[str, ...] = get_args(RunnerKind)
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int8", "4bit")
RUNGS = ("gpu", "gpu-int8", "gpu-4bit", "gpu-cpu-split", "cpu", "cpu-int8", "cpu-4bit", "smaller-context")
# the quantization each rung loads its weights with (rungs not named here keep them as they are)
RUNG_QUANTIZATION: dict[str, Quantization] = {
    "gpu-int8": "int8",
    "gpu-4bit": "4bit",
    "cpu-int8": "int8",
    "cpu-4bit": "4bit",
}
DEFAULT_CONTEXT_TOKENS = 4096
DEFAULT_MAX_BATCH_TOKENS = 2048
MAX_CONCURRENCY = 4096
CONTEXT_STEP_TOKENS = 256


@dataclass(frozen=True)
class Request:
    """What the caller wants served. ``context_tokens`` counts prompt and completion of one sequence."""

    context_tokens: int
    concurrency: int = 1
    quantization: QuantizationRequest = "auto"
    # the smallest context the smaller-context rung may choose; None: never below context_tokens
    min_context_tokens: int | None = None
    # tokens in one forward (the engine's prefill chunk); bounds the activations
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    # how the runner generates: each engine holds its cache and activations its own way (memory/estimate.py)
    engine: Engine = CONTINUOUS_BATCHING
    # what one request may carry to a vision-language model, priced by an image-text plan (memory/vision.py)
    images: ImageLimits = field(default_factory=ImageLimits)

    def to_json(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "concurrency": self.concurrency,
            "quantization": self.quantization,
            "min_context_tokens": self.min_context_tokens,
            "max_batch_tokens": self.max_batch_tokens,
            "engine": self.engine,
        } | ({"images": image_caps_json(self.images)} if self.engine == IMAGE_TEXT else {})


def image_caps_json(limits: ImageLimits) -> dict[str, int]:
    """The caps an image-text plan is priced for, as a plan file carries them to its runner."""
    return {"max_images": limits.max_images, "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels}


@dataclass(frozen=True)
class Policy:
    """What the operator allows: which devices and rungs may be used."""

    allow_gpu: bool = True
    allow_split: bool = True
    allow_cpu: bool = True
    # rungs ruled out by what already happened (the pool skips a rung whose runner the watchdog killed)
    skip_rungs: frozenset[str] = frozenset()

    def below(self, rung: str) -> Policy:
        """This policy with ``rung`` and every rung above it skipped: "retry one rung lower"."""
        above = RUNGS[: RUNGS.index(rung) + 1] if rung in RUNGS else (rung,)
        return replace(self, skip_rungs=self.skip_rungs | frozenset(above))


@dataclass(frozen=True)
class Rung:
    """One rung priced for this host: where everything goes, and whether it fits."""

    name: str
    fits: bool
    available: bool
    why: str
    dtype: str
    quantization: Quantization
    context_tokens: int
    concurrency: int
    devices: dict[str, DeviceNeed] = field(default_factory=dict)
    device_map: dict[str, str] = field(default_factory=dict)  # block name → device
    blocked: str | None = None  # why the rung is not available (policy, software, the watchdog), when it is not
    runner: RunnerKind = "transformers"  # the engine that would serve it

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices.values())

    def where(self) -> str:
        """``cpu 896.5 MiB of 19.6 GiB usable``, per device: what a NoFit line shows for a rung that would fit."""
        return ", ".join(
            f"{d} {format_bytes(n.total_bytes)} of {format_bytes(n.free_bytes)} usable" for d, n in self.devices.items()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fits": self.fits,
            "available": self.available,
            "why": self.why,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "context_tokens": self.context_tokens,
            "concurrency": self.concurrency,
            "devices": {name: need.to_json() for name, need in self.devices.items()},
            "runner": self.runner,
        }


@dataclass(frozen=True)
class Plan:
    """The chosen rung: what a runner is started with."""

    rung: str
    dtype: str
    quantization: Quantization
    context_tokens: int
    concurrency: int
    max_batch_tokens: int
    devices: dict[str, DeviceNeed]
    device_map: dict[str, str]
    engine: Engine = CONTINUOUS_BATCHING  # how memserve's own runner batches (estimate.py)
    runner: RunnerKind = "transformers"  # the engine (runner kind) that serves the plan
    images: ImageLimits | None = None  # an image-text plan's caps on one request's images, which it priced

    @property
    def reserved_bytes(self) -> dict[str, int]:
        return {name: need.total_bytes for name, need in self.devices.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "context_tokens": self.context_tokens,
            "concurrency": self.concurrency,
            "max_batch_tokens": self.max_batch_tokens,
            "devices": {name: need.to_json() for name, need in self.devices.items()},
            "device_map": self.device_map,
            "engine": self.engine,
            "runner": self.runner,
        } | ({"images": image_caps_json(self.images)} if self.images is not None else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """The plan :meth:`to_json` wrote (a plan file crosses from the gateway to its runner this way).

        Keys it does not know are ignored (a plan file carries the pool's limits beside the plan); a
        missing or mistyped field is an InvalidArgument naming it, never a KeyError later.
        """
        quantization = _field(data, "quantization", str)
        if quantization not in get_args(Quantization):
            raise InvalidArgument(
                f"plan field 'quantization' must be one of {', '.join(get_args(Quantization))}, got {quantization!r}"
            )
        devices = _field(data, "devices", dict)
        device_map = _field(data, "device_map", dict)
        engine = data.get("engine", CONTINUOUS_BATCHING)  # plans written before the field: the default engine
        if engine not in get_args(Engine):
            raise InvalidArgument(f"plan field 'engine' must be one of {', '.join(get_args(Engine))}, got {engine!r}")
        runner = data.get("runner", "transformers")  # plans written before engines were runner kinds
        if runner not in RUNNER_KINDS:
            raise InvalidArgument(f"plan field 'runner' must be one of {', '.join(RUNNER_KINDS)}, got {runner!r}")
        return cls(
            rung=_field(data, "rung", str),
            dtype=_field(data, "dtype", str),
            quantization=quantization,  # type: ignore[arg-type]  # checked against Quantization above
            context_tokens=_field(data, "context_tokens", int),
            concurrency=_field(data, "concurrency", int),
            max_batch_tokens=_field(data, "max_batch_tokens", int),
            devices={str(name): _device_need(str(name), need) for name, need in devices.items()},
            device_map={str(block): str(device) for block, device in device_map.items()},
            engine=engine,
            runner=runner,
            images=_image_caps(data.get("images")),
        )


def _image_caps(data: Any) -> ImageLimits | None:
    """The caps ``image_caps_json`` wrote, or None (not an image-text plan)."""
    if data is None:
        return None
    return ImageLimits(
        max_images=_field(data, "max_images", int),
        max_bytes=_field(data, "max_bytes", int),
        max_pixels=_field(data, "max_pixels", int),
    )


_T = TypeVar("_T")


def _field(data: Mapping[str, Any], key: str, kind: type[_T]) -> _T:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(
            f"plan field {key!r} must be {kind.__name__}, got {value!r}; write the plan with memserve fit MODEL --json"
        )
    return value


def _device_need(device: str, data: Any) -> DeviceNeed:
    """A device's need as ``DeviceNeed.to_json`` wrote it; its ``total_bytes`` is derived, so it is not read."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"plan field 'devices' has {data!r} for {device}, not an object of byte counts")
    sizes = {
        key: _field(data, key, int)
        for key in ("weights_bytes", "kv_cache_bytes", "activation_bytes", "runtime_bytes", "free_bytes")
    }
    return DeviceNeed(**sizes)


@dataclass(frozen=True)
class NoFit:
    """Nothing fits: what was needed and free per device, and the nearest options. An answer, not an error."""

    model: str
    needed: dict[str, DeviceNeed]  # the closest rung's need per device
    closest_rung: str
    alternatives: tuple[str, ...]
    # set when the closest rung would fit but is not available: why (then no device is short)
    closest_blocked: str | None = None

    @property
    def message(self) -> str:
        parts = [
            f"{name} needs {format_bytes(n.total_bytes)} (weights {format_bytes(n.weights_bytes)}, KV cache "
            f"{format_bytes(n.kv_cache_bytes)}, activations {format_bytes(n.activation_bytes)}, runtime "
            f"{format_bytes(n.runtime_bytes)}) but has {format_bytes(n.free_bytes)} usable"
            for name, n in self.needed.items()
            if not n.fits
        ]
        if parts:
            text = f"{self.model} does not fit on this host; closest is {self.closest_rung}: " + "; ".join(parts)
        else:  # the closest rung fits in memory but something else rules it out: say what
            where = ", ".join(
                f"{d} {format_bytes(n.total_bytes)} of {format_bytes(n.free_bytes)} usable"
                for d, n in self.needed.items()
            )
            text = (
                f"{self.model} has no allowed placement on this host; {self.closest_rung} would fit ({where}) "
                f"but {self.closest_blocked or 'it is not available'}"
            )
        if self.alternatives:
            text += ". Nearest options: " + "; ".join(self.alternatives)
        elif parts:
            text += ". Free memory, raise --memory, or choose a smaller model"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "closest_rung": self.closest_rung,
            "needed": {name: need.to_json() for name, need in self.needed.items()},
            "alternatives": list(self.alternatives),
        }


@dataclass(frozen=True)
class PlanResult:
    """Every rung as priced, and either the chosen plan or the NoFit answer."""

    rungs: tuple[Rung, ...]
    plan: Plan | None
    nofit: NoFit | None

    def to_json(self) -> dict[str, Any]:
        return {
            "rungs": [r.to_json() for r in self.rungs],
            "plan": self.plan.to_json() if self.plan else None,
            "nofit": self.nofit.to_json() if self.nofit else None,
        }


# ------------------------------------------------------------------------------------ validation


def validate_request(facts: CheckpointFacts | GgufFacts, request: Request) -> None:
    """Reject what no plan could mean: one line saying what was wrong and what is accepted."""
    limit = facts.max_context_tokens
    if request.context_tokens < 1:
        raise InvalidArgument(f"context must be a positive number of tokens, got {request.context_tokens}")
    if limit is not None and request.context_tokens > limit:
        raise InvalidArgument(
            f"context {request.context_tokens} tokens is more than {facts.source} supports "
            f"({facts.context_limit_key} {limit}); pass --context {limit} or less",
            param="context",
        )
    if not 1 <= request.concurrency <= MAX_CONCURRENCY:
        raise InvalidArgument(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {request.concurrency}")
    if request.quantization not in QUANTIZATIONS:
        raise InvalidArgument(
            f"unknown quantization {request.quantization!r}; expected one of {', '.join(QUANTIZATIONS)}"
        )
    if request.min_context_tokens is not None and not 1 <= request.min_context_tokens <= request.context_tokens:
        raise InvalidArgument(
            f"min context must be between 1 and the context ({request.context_tokens}), "
            f"got {request.min_context_tokens}"
        )
    if request.max_batch_tokens < 1:
        raise InvalidArgument(f"max batch tokens must be positive, got {request.max_batch_tokens}")


# --------------------------------------------------------------------------------------- pricing


def _gpu_dtype(facts: CheckpointFacts, gpus: tuple[Device, ...]) -> str:
    bf16_ok = all(g.compute_capability is None or g.compute_capability >= (8, 0) for g in gpus)
    if facts.dtype == "bfloat16" and not bf16_ok:
        return "float16"
    if facts.dtype == "float32":
        return "bfloat16" if bf16_ok else "float16"
    return facts.dtype


def _cpu_dtype(facts: CheckpointFacts) -> str:
    return "bfloat16" if facts.dtype == "float16" else facts.dtype


def cpu_quantization_blocked(facts: CheckpointFacts, quantization: Quantization) -> str | None:
    """Why the CPU kernels (``runner/quantize.py``) cannot quantize this model as priced, or None when they can.

    The runner quantizes each ``nn.Linear`` inside the decoder layers. MoE experts are fused 3-D tensors in
    transformers, not Linears, so their bytes would stay as stored while the price counts them quantized.
    The 4-bit kernel needs every input width to be a whole number of groups of 32 and every output width a
    multiple of 16; the widths of a decoder layer's Linears are the hidden size, the attention projections'
    and the MLP's.
    """
    if facts.experts:
        return (
            f"CPU {quantization} quantizes Linear layers and this model's {facts.experts} experts are fused tensors "
            "that it would leave as they are"
        )
    if quantization == "4bit":
        widths = {
            facts.hidden_size,
            facts.intermediate_size,
            facts.heads * facts.head_dim,
            facts.kv_heads * facts.head_dim,
        }
        odd = sorted(w for w in widths if w % CPU_INT4_GROUP_SIZE)
        if odd:
            return (
                f"CPU 4-bit needs layer widths that are multiples of {CPU_INT4_GROUP_SIZE}; this model has "
                f"{', '.join(map(str, odd))} (use cpu-int8: --quantization int8)"
            )
    return None


QUEUE_PER_SEQUENCE = 4  # requests allowed to wait per sequence generated at once, unless max_queue says otherwise


def image_requests_held(concurrency: int) -> int:
    """Prepared requests an image-text plan prices the pixel values of: ``concurrency`` sequences and the default
    queue behind them, whatever ``max_queue`` says. The runner prepares no more than this at once
    (``ImageCompleter.held``); a longer queue waits unprepared, holding nothing in the runner."""
    return concurrency * (1 + QUEUE_PER_SEQUENCE)


IMAGE_BODY_BYTES = 16 * 1024 * 1024
"""The largest request body an image-text runner is priced for: the gateway's default ``max_body_bytes`` (base64
images are 4/3 of their bytes, so 4 images of 10 MiB could not pass it anyway)."""


def _pack(
    facts: CheckpointFacts,
    devices: tuple[Device, ...],
    dtype: str,
    quantization: Quantization,
    context_tokens: int,
    concurrency: int,
    max_batch_tokens: int,
    host: Device,
    engine: Engine = CONTINUOUS_BATCHING,
    images: ImageLimits | None = None,
) -> tuple[dict[str, DeviceNeed], dict[str, str]]:
    """Place blocks in order across ``devices``; whatever does not fit lands on the last one.

    The result always places everything, so an overfull last device shows how much is missing.
    """
    kv_total = kv_cache_bytes(facts, dtype, context_tokens, concurrency, engine)
    layer_blocks = sum(1 for b in facts.blocks if b.name.startswith("layer."))
    kv_per_layer = kv_total // max(1, layer_blocks)
    batch_tokens = batch_tokens_for(context_tokens, concurrency, max_batch_tokens)
    act = activation_bytes(facts, dtype, batch_tokens, concurrency, context_tokens, engine)
    if engine == IMAGE_TEXT and facts.vision is not None:
        limits = images or ImageLimits()  # what the runner admits per request (wire/images.py)
        act += image_cost(
            facts.vision,
            dtype,
            images=limits.max_images,
            max_pixels=limits.max_pixels,
            concurrency=concurrency,
            max_body_bytes=IMAGE_BODY_BYTES,
            waiting=image_requests_held(concurrency) - concurrency,
        ).total_bytes
    cpu_runtime = CPU_GENERATE_RUNTIME_BYTES if engine != CONTINUOUS_BATCHING else CPU_RUNTIME_BYTES
    needs: dict[str, dict[str, int]] = {}
    device_map: dict[str, str] = {}

    def fixed(device: Device) -> dict[str, int]:
        runtime = GPU_RUNTIME_BYTES if device.kind == "cuda" else cpu_runtime
        return {"weights": 0, "kv": 0, "act": act, "runtime": runtime}

    index = 0
    needs[devices[0].name] = fixed(devices[0])
    for block in facts.blocks:
        kv = kv_per_layer if block.name.startswith("layer.") else 0
        while True:
            device = devices[index]
            w = block_weight_bytes(block, facts, dtype, quantization, mapped=device.kind == "cpu")
            n = needs[device.name]
            used = n["weights"] + n["kv"] + n["act"] + n["runtime"]
            last = index == len(devices) - 1
            if used + w + kv <= device.usable_bytes or last:
                n["weights"] += w
                n["kv"] += kv
                device_map[block.name] = device.name
                break
            index += 1
            needs[devices[index].name] = fixed(devices[index])
    if any(d.kind == "cuda" for d in devices) and host.name not in needs:
        # a process driving a GPU still lives in host RAM
        needs[host.name] = {"weights": 0, "kv": 0, "act": 0, "runtime": GPU_HOST_RUNTIME_BYTES}
    elif any(d.kind == "cuda" for d in devices):
        needs[host.name]["runtime"] = max(needs[host.name]["runtime"], GPU_HOST_RUNTIME_BYTES)
    by_name = {d.name: d for d in (*devices, host)}
    return (
        {
            name: DeviceNeed(n["weights"], n["kv"], n["act"], n["runtime"], by_name[name].usable_bytes)
            for name, n in needs.items()
        },
        device_map,
    )


def placement_blocked(name: str, policy: Policy) -> str | None:
    """Why ``policy`` rules out the rung ``name`` (``gpu*`` rungs use GPUs, ``gpu-cpu-split`` both, the rest
    host RAM), whatever the engine; None when it allows it."""
    on_gpu = name.startswith("gpu")
    if name in policy.skip_rungs:
        return "a runner on this rung or one above it used more memory than planned, so it is skipped"
    if on_gpu and not policy.allow_gpu:
        return "GPUs are not allowed by policy"
    if name == "gpu-cpu-split" and not (policy.allow_split and policy.allow_cpu):
        return "splitting across GPU and CPU is not allowed by policy"
    if not on_gpu and not policy.allow_cpu:
        return "CPU placement is not allowed by policy"
    return None


def _weights_blocked(
    facts: CheckpointFacts, quantization: Quantization, asked: str, on_gpu: bool, inventory: Inventory
) -> str | None:
    """Why the checkpoint's weights cannot be served as ``quantization`` there (what was asked for, what is
    installed, what the checkpoint already is); None when they can."""
    if quantization != "none" and facts.prequantized:
        method = (facts.quantization or {}).get("quant_method")
        return f"the checkpoint is already quantized ({method})" if method else "the checkpoint is already quantized"
    if quantization != "none" and asked not in ("auto", quantization):
        return f"--quantization {asked} rules out {quantization}"
    if quantization == "none" and asked in ("int8", "4bit"):
        return f"--quantization {asked} asks for quantized weights"
    if quantization != "none" and on_gpu and not inventory.bitsandbytes:
        return "bitsandbytes is not installed (pip install 'memserve[gpu]')"
    if quantization != "none" and not on_gpu:
        return cpu_quantization_blocked(facts, quantization)
    if not on_gpu and facts.prequantized:
        method = (facts.quantization or {}).get("quant_method", "pre-quantized")
        return f"{method} checkpoints need a GPU kernel; CPU cannot run them"
    return None


def _price(
    name: str,
    facts: CheckpointFacts,
    request: Request,
    inventory: Inventory,
    policy: Policy,
    context_tokens: int,
) -> Rung:
    gpus = inventory.gpus
    cpu = inventory.cpu
    quant_req = request.quantization
    quantization: Quantization = RUNG_QUANTIZATION.get(name, "none")
    on_gpu = name.startswith("gpu")

    if on_gpu and not gpus:
        return Rung(
            name,
            False,
            False,
            "no CUDA GPU on this host",
            facts.dtype,
            quantization,
            context_tokens,
            request.concurrency,
            blocked="there is no CUDA GPU on this host",
        )
    blocked = placement_blocked(name, policy) or _weights_blocked(facts, quantization, quant_req, on_gpu, inventory)

    devices: tuple[Device, ...]
    if not on_gpu:
        dtype, devices = _cpu_dtype(facts), (cpu,)
    elif name == "gpu-cpu-split":
        dtype, devices = _gpu_dtype(facts, gpus), (*gpus, cpu)
    else:
        dtype, devices = _gpu_dtype(facts, gpus), gpus
    needs, device_map = _pack(
        facts,
        devices,
        dtype,
        quantization,
        context_tokens,
        request.concurrency,
        request.max_batch_tokens,
        cpu,
        request.engine,
        request.images,
    )
    fits, why = fit_words(needs, blocked)
    return Rung(
        name,
        fits and blocked is None,
        blocked is None,
        why,
        dtype,
        quantization,
        context_tokens,
        request.concurrency,
        needs,
        device_map,
        blocked,
    )


def fit_words(needs: Mapping[str, DeviceNeed], blocked: str | None) -> tuple[bool, str]:
    """Whether ``needs`` fit on their devices, and a rung's ``why`` saying so: every engine prices its rungs
    its own way and says the outcome in these words."""
    fits = all(n.fits for n in needs.values())
    if fits:
        where = ", ".join(
            f"{d}: {format_bytes(n.total_bytes)} of {format_bytes(n.free_bytes)}" for d, n in needs.items()
        )
        return True, f"not available: {blocked}; it would fit ({where})" if blocked else f"fits ({where})"
    short = "; ".join(
        f"{d} needs {format_bytes(n.total_bytes)}, {format_bytes(n.free_bytes)} usable"
        for d, n in needs.items()
        if not n.fits
    )
    return False, f"not available: {blocked}; it would not fit either: {short}" if blocked else short


Pricer = Callable[[str, int, Request], Rung]  # (rung name, context tokens, request) -> that rung priced


def _largest_context(name: str, price: Pricer, request: Request, floor: int) -> Rung | None:
    """The rung at the largest context in [floor, requested) that fits.

    Candidates are the floor and the multiples of 256 tokens above it (numbers people type); the KV
    cache grows with context, so fitting is monotonic and a bisection finds the largest.
    """
    step = CONTEXT_STEP_TOKENS
    candidates = [floor, *range((floor // step + 1) * step, request.context_tokens, step)]
    best: Rung | None = None
    low, high = 0, len(candidates) - 1
    while low <= high:
        mid = (low + high) // 2
        rung = price(name, candidates[mid], request)
        if rung.fits:
            best, low = rung, mid + 1
        else:
            high = mid - 1
    return best


def _alternatives(price: Pricer, request: Request, rungs: list[Rung]) -> list[str]:
    """The nearest options a person can act on, best first."""
    options: list[str] = []
    ruled_out: dict[str, list[str]] = {}  # rungs that would fit, by what rules them out
    for rung in rungs:
        if not rung.available and rung.devices and all(n.fits for n in rung.devices.values()):
            ruled_out.setdefault(rung.blocked or "it is not available", []).append(f"{rung.name} ({rung.where()})")
    options += [f"{', '.join(names)} would fit but {reason}" for reason, names in ruled_out.items()]
    placements = [r.name for r in rungs if r.available and r.devices]
    smallest = 1 if request.min_context_tokens is None else request.min_context_tokens
    for name in placements:
        shorter = _largest_context(name, price, request, min(smallest, CONTEXT_STEP_TOKENS))
        if shorter is not None and shorter.context_tokens < request.context_tokens:
            options.append(f"fits as {shorter.name} with --context {shorter.context_tokens}")
            break
    if request.concurrency > 1:
        for name in placements:
            for concurrency in range(request.concurrency - 1, 0, -1):
                rung = price(name, request.context_tokens, replace(request, concurrency=concurrency))
                if rung.fits:
                    options.append(f"fits as {rung.name} with --concurrency {concurrency}")
                    break
            else:
                continue
            break
    return options


def plan(facts: CheckpointFacts, request: Request, inventory: Inventory, policy: Policy | None = None) -> PlanResult:
    """Price every rung and choose the first that fits; otherwise a NoFit with the nearest options."""
    validate_request(facts, request)
    rules = policy or Policy()

    def price(name: str, context_tokens: int, request: Request) -> Rung:
        return _price(name, facts, request, inventory, rules, context_tokens)

    return ladder(facts.source, RUNGS[:-1], price, request, rules, dtype=facts.dtype)


def ladder(
    model: str,
    names: Sequence[str],
    price: Pricer,
    request: Request,
    policy: Policy,
    *,
    dtype: str,
    runner: RunnerKind = "transformers",
    hints: Sequence[str] = (),
) -> PlanResult:
    """The ladder every engine climbs: its rungs ``names`` priced by ``price``, the first that fits chosen, else
    the largest smaller context the request allows (``smaller-context``), else a NoFit with the nearest options
    (and the engine's own ``hints``). ``dtype`` and ``runner`` label the smaller-context row when unused."""
    rungs = [price(name, request.context_tokens, request) for name in names]
    chosen = next((r for r in rungs if r.fits), None)

    smaller: Rung | None = None
    floor = request.min_context_tokens
    if (
        chosen is None
        and floor is not None
        and floor < request.context_tokens
        and "smaller-context" not in policy.skip_rungs
    ):
        for name in names:
            smaller = _largest_context(name, price, request, floor)
            if smaller is not None:
                break
    if smaller is not None:
        chosen = replace(smaller, why=f"{smaller.name} with context {smaller.context_tokens}: {smaller.why}")
        rungs.append(replace(chosen, name="smaller-context"))
    else:
        why = (
            "not needed: the requested context fits"
            if chosen is not None
            else "no smaller context allowed (pass --min-context to allow one)"
            if floor is None
            else f"nothing fits even at --min-context {floor}"
        )
        rungs.append(
            Rung(
                "smaller-context",
                False,
                floor is not None,
                why,
                dtype,
                "none",
                request.context_tokens,
                request.concurrency,
                runner=runner,
            )
        )

    if chosen is not None:
        result = Plan(
            rung=chosen.name if smaller is None else "smaller-context",
            dtype=chosen.dtype,
            quantization=chosen.quantization,
            context_tokens=chosen.context_tokens,
            concurrency=chosen.concurrency,
            max_batch_tokens=batch_tokens_for(chosen.context_tokens, chosen.concurrency, request.max_batch_tokens),
            devices=chosen.devices,
            device_map=chosen.device_map,
            engine=request.engine,
            runner=chosen.runner,
            images=request.images if request.engine == IMAGE_TEXT else None,
        )
        return PlanResult(tuple(rungs), result, None)

    priced = [r for r in rungs if r.available and r.devices] or [r for r in rungs if r.devices]
    closest = min(priced, key=lambda r: sum(max(0, n.total_bytes - n.free_bytes) for n in r.devices.values()))
    closest_fits = all(n.fits for n in closest.devices.values())
    others = [r for r in rungs[:-1] if not (closest_fits and r.name == closest.name)]  # said once, in the head
    nofit = NoFit(
        model=model,
        needed=closest.devices,
        closest_rung=closest.name,
        alternatives=(*_alternatives(price, request, others), *hints),
        closest_blocked=closest.blocked if closest_fits else None,
    )
    return PlanResult(tuple(rungs), None, nofit)
