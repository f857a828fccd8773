"""vLLM as a runner kind: its memory priced into rungs, and a plan turned into ``vllm serve``'s argv. Pure.

**What ``--gpu-memory-utilization`` means** (read in vLLM's source, ``vllm/v1/worker/gpu_worker.py`` at
commit 35d5cda, ``Worker.init_device`` and ``Worker.determine_available_memory``; ``vllm/utils/mem_utils.py:
memory_profiling``):

- it is a fraction of the device's *total* memory, per instance: ``requested_memory = total_memory ×
  gpu_memory_utilization``. Other processes' bytes are not subtracted from it; they only matter through a
  start-up check, ``free_memory < requested_memory`` → ``ValueError("Free memory on device ... is less than
  desired GPU memory utilization")``;
- within that share vLLM profiles one forward of ``max_num_batched_tokens`` tokens and gives the KV cache
  everything left: ``requested_memory − (weights + peak activations + non-torch memory)``. So it takes the
  whole share whatever the context asks for: the share *is* its memory, and the KV cache it allocates is at
  least what ``max_model_len × max_num_seqs`` needs when the share was computed from that;
- outside the share: the CUDA context it created before the snapshot the share is measured from, and the
  CUDA graphs it captures after the KV cache is allocated (``compile_or_warm_up_model``: "memory_profiling
  does not consider CUDAGraph memory size").

So a plan's reservation R on a GPU is weights + KV (``max_model_len × max_num_seqs``, in 16-token blocks) +
activations (the profile forward, the sampler's warm-up, the non-torch increase) + runtime (the CUDA context
and the CUDA graphs), and ``U = (R − runtime) / total``: vLLM's share plus what it holds outside the share
equals the reservation. A reservation above the plan (a calibrated figure) only gives the KV cache more.
Newer vLLM versions may count CUDA graphs inside the share (an estimate subtracted from the KV cache); then
vLLM uses up to the graphs' bytes less than reserved and its KV cache shrinks by as much.

The figures for the runtime, graphs and host process are not yet measured on a GPU here
(``benchmarks/gpu_check.sh`` checks NVML after ready against the plan); docs/engines.md says what was verified.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from memserve.checkpoint.facts import CheckpointFacts
from memserve.engines import VLLM_COMMAND_ENV, engine_command, is_installed
from memserve.errors import InvalidArgument, RunnerFailed
from memserve.memory.estimate import DTYPE_WIDTH, DeviceNeed, GiB, MiB, Quantization, block_weight_bytes
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import NoFit, Plan, PlanResult, Policy, Request, Rung, fit_words
from memserve.units import format_bytes

COMMAND_ENV = VLLM_COMMAND_ENV
INSTALL = "pip install 'memserve[vllm]' on a CUDA machine"
RUNGS = ("vllm", "vllm-4bit")
KV_BLOCK_TOKENS = 16  # vLLM's default --block-size on CUDA
CUDA_CONTEXT_BYTES = 512 * MiB  # the CUDA context and libraries' device memory, before vLLM's snapshot
NON_TORCH_BYTES = 256 * MiB  # cuBLAS/NCCL workspaces vLLM's profile counts as its non-torch increase
CUDA_GRAPH_BASE_BYTES = 64 * MiB  # captured graphs: a base, plus per layer (decode sizes 1..512)
CUDA_GRAPH_LAYER_BYTES = 8 * MiB
HOST_RUNTIME_BYTES = 4 * GiB  # host RAM of the API server and engine-core processes (torch, CUDA libraries)
SAMPLER_COPIES = 3  # fp32 logits, their softmax and the sampler's sort, for max_num_seqs rows
PREQUANTIZED_METHODS = ("awq", "gptq", "awq_marlin", "gptq_marlin", "compressed-tensors", "fp8", "bitsandbytes")
_VLLM_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
# its engine-core and worker processes start with exec (spawn), not as forked copies of the API server: the
# watchdog leaves a process that has not exec'd out of a runner's memory (its pages are its parent's until then)
ENVIRON = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


# ---------------------------------------------------------------------------------------------- command


def command(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """How to run vLLM: ``MEMSERVE_VLLM_COMMAND`` (split like a shell), else ``vllm`` on PATH; None if neither."""
    found = engine_command("vllm", environ)
    return list(found) if found else None


def utilization(reserved_bytes: int, outside_bytes: int, total_bytes: int) -> float:
    """``--gpu-memory-utilization`` for a reservation: vLLM's share of the device's total (``outside_bytes``,
    the CUDA context and graphs, sit outside its share), rounded down to 4 places so it never takes more."""
    if total_bytes <= 0:
        raise RunnerFailed(f"cannot compute vLLM's memory share: the GPU's total is {total_bytes} bytes")
    share = math.floor((reserved_bytes - outside_bytes) / total_bytes * 10_000) / 10_000
    if not 0 < share <= 1:
        raise RunnerFailed(
            f"a reservation of {format_bytes(reserved_bytes)} on a {format_bytes(total_bytes)} GPU gives vLLM a "
            f"share of {share}; plan it again with memserve fit MODEL"
        )
    return share


def arguments(
    name: str,
    launch: PlanFile,
    *,
    host: str,
    port: int,
    total_bytes: Mapping[str, int] | None = None,
    adapters: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """``vllm serve SOURCE ...`` for ``launch``'s plan, served as ``name`` on ``host:port``.

    ``total_bytes`` is each GPU's total (the utilization is a fraction of it); ``adapters`` maps LoRA names to
    folders. RunnerFailed when vLLM is not installed (naming the install command) or a GPU's total is unknown.
    """
    executable = command(environ)
    if executable is None:
        raise RunnerFailed(f"vLLM is not installed (no vllm on PATH and {COMMAND_ENV} is not set): {INSTALL}")
    plan = launch.plan
    gpus = sorted(d for d in plan.devices if d.startswith("cuda"))
    if not gpus:
        raise RunnerFailed(f"the plan for {name} places nothing on a GPU; vLLM needs a CUDA GPU")
    totals = dict(total_bytes or {})
    missing = [g for g in gpus if g not in totals]
    if missing:
        raise RunnerFailed(f"cannot compute vLLM's memory share: the total of {', '.join(missing)} is unknown")
    reserved = launch.reservation_bytes
    share = min(utilization(reserved.get(g, 0), plan.devices[g].runtime_bytes, totals[g]) for g in gpus)
    argv = [
        *executable,
        "serve",
        launch.source,
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        name,
        "--gpu-memory-utilization",
        f"{share:.4f}",
        "--max-model-len",
        str(plan.context_tokens),
        "--max-num-seqs",
        str(plan.concurrency),
        "--max-num-batched-tokens",
        str(max(plan.max_batch_tokens, plan.concurrency)),
        "--dtype",
        _VLLM_DTYPES.get(plan.dtype, "auto"),
    ]
    method = "bitsandbytes" if plan.quantization == "4bit" else checkpoint_quantization(launch.source)
    if method is not None:
        argv += ["--quantization", method]
    if adapters:
        argv += ["--enable-lora", "--max-loras", str(len(adapters)), "--lora-modules"]
        argv += [f"{adapter}={path}" for adapter, path in adapters.items()]
    if len(gpus) > 1:
        argv += ["--tensor-parallel-size", str(len(gpus))]
    return argv


def checkpoint_quantization(source: str) -> str | None:
    """The pre-quantized method of a local checkpoint's ``config.json`` (AWQ, GPTQ, ...) that vLLM names in
    ``--quantization``; None for a plain checkpoint, a hub id or one it cannot read (vLLM then reads it itself)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if method in PREQUANTIZED_METHODS else None


# ---------------------------------------------------------------------------------------------- pricing


def kv_cache_bytes(facts: CheckpointFacts, dtype: str, context_tokens: int, concurrency: int) -> int:
    """KV for ``concurrency`` sequences of ``context_tokens``, each rounded up to whole 16-token blocks, every layer
    full-sized (vLLM's hybrid allocator may hold less for sliding-window layers: this is the upper bound)."""
    width = DTYPE_WIDTH.get(dtype, 2) if not facts.prequantized else 2
    blocks = math.ceil(context_tokens / KV_BLOCK_TOKENS)
    return facts.kv_bytes_per_token(width) * blocks * KV_BLOCK_TOKENS * concurrency


def activation_bytes(facts: CheckpointFacts, dtype: str, batch_tokens: int, concurrency: int) -> int:
    """vLLM's profile forward over ``batch_tokens`` (the residual stream, the MLP's intermediate tensors, q/k/v),
    the sampler's warm-up over ``concurrency`` rows of fp32 logits, and the non-torch increase."""
    width = DTYPE_WIDTH.get(dtype, 2)
    ffn = facts.intermediate_size * (facts.experts_per_token or 1)
    qkv = (facts.heads + 2 * facts.kv_heads) * facts.head_dim
    forward = batch_tokens * (4 * facts.hidden_size + 2 * ffn + qkv) * width
    logits = concurrency * facts.vocab_size * 4 * SAMPLER_COPIES
    return forward + logits + NON_TORCH_BYTES


def cuda_graph_bytes(facts: CheckpointFacts) -> int:
    return CUDA_GRAPH_BASE_BYTES + facts.layers * CUDA_GRAPH_LAYER_BYTES


def _gpu_dtype(facts: CheckpointFacts, gpus: tuple[Device, ...]) -> str:
    bf16 = all(g.compute_capability is None or g.compute_capability >= (8, 0) for g in gpus)
    if facts.prequantized:
        return "float16"
    if facts.dtype in ("float32", "bfloat16"):
        return "bfloat16" if bf16 else "float16"
    return facts.dtype


def _tensor_parallel(facts: CheckpointFacts, gpus: tuple[Device, ...]) -> tuple[Device, ...]:
    """The GPUs vLLM spreads the model over: all of them when the heads divide evenly, else the first."""
    n = len(gpus)
    if n > 1 and facts.heads % n == 0 and (facts.kv_heads % n == 0 or n % facts.kv_heads == 0):
        return gpus
    return gpus[:1]


def price(
    name: str,
    facts: CheckpointFacts,
    request: Request,
    inventory: Inventory,
    policy: Policy,
    *,
    installed: bool,
    context_tokens: int | None = None,
) -> Rung:
    """One vLLM rung (``vllm``: as stored; ``vllm-4bit``: bitsandbytes on the fly) priced for this host."""
    context = context_tokens or request.context_tokens
    quantization: Quantization = "4bit" if name == "vllm-4bit" else "none"
    gpus = inventory.gpus
    if not gpus:
        return Rung(
            name,
            False,
            False,
            "needs a CUDA GPU",
            facts.dtype,
            quantization,
            context,
            request.concurrency,
            blocked="vLLM needs a CUDA GPU",
            runner="vllm",
        )
    blocked = _blocked(name, facts, request, policy, installed=installed)
    used = _tensor_parallel(facts, gpus)
    dtype = _gpu_dtype(facts, used)
    n = len(used)
    weights = sum(block_weight_bytes(b, facts, dtype, quantization, mapped=False) for b in facts.blocks)
    batch_tokens = max(request.concurrency, request.max_batch_tokens)
    kv = kv_cache_bytes(facts, dtype, context, request.concurrency)
    act = activation_bytes(facts, dtype, batch_tokens, request.concurrency)
    runtime = CUDA_CONTEXT_BYTES + cuda_graph_bytes(facts)
    needs = {g.name: DeviceNeed(-(-weights // n), -(-kv // n), act, runtime, g.usable_bytes) for g in used}
    needs[inventory.cpu.name] = DeviceNeed(runtime_bytes=HOST_RUNTIME_BYTES, free_bytes=inventory.cpu.usable_bytes)
    fits, why = fit_words(needs, blocked)
    device_map = (
        {b.name: used[0].name for b in facts.blocks} if n == 1 else {b.name: "tensor-parallel" for b in facts.blocks}
    )
    return Rung(
        name,
        fits and blocked is None,
        blocked is None,
        why,
        dtype,
        quantization,
        context,
        request.concurrency,
        needs,
        device_map,
        blocked,
        runner="vllm",
    )


def _blocked(name: str, facts: CheckpointFacts, request: Request, policy: Policy, *, installed: bool) -> str | None:
    if not installed:
        return f"vLLM is not installed ({INSTALL})"
    if name in policy.skip_rungs:
        return "a runner on this rung used more memory than planned, so it is skipped"
    if not policy.allow_gpu:
        return "GPUs are not allowed by policy"
    if facts.format != "safetensors" and facts.format != "bin":
        return f"vLLM does not read {facts.format} checkpoints here"
    if name == "vllm-4bit":
        if facts.prequantized:
            return "the checkpoint is already quantized"
        if request.quantization not in ("auto", "4bit"):
            return f"--quantization {request.quantization} rules out 4-bit"
        return None
    if request.quantization == "int8":
        return "vLLM quantizes on the fly only to 4-bit (bitsandbytes); use 4bit or a pre-quantized checkpoint"
    if request.quantization == "4bit" and not facts.prequantized:
        return "--quantization 4bit asks for quantized weights"
    if facts.prequantized:
        method = (facts.quantization or {}).get("quant_method")
        if method not in PREQUANTIZED_METHODS:
            return f"vLLM has no kernel here for {method or 'this'} pre-quantized checkpoint"
    return None


def rungs(
    facts: CheckpointFacts,
    request: Request,
    inventory: Inventory,
    policy: Policy,
    *,
    installed: bool | None = None,
) -> list[Rung]:
    """The vLLM rungs for this host, best first (as stored, then 4-bit); ``installed`` defaults to whether vLLM
    can be started here (``memserve.engines.installed``)."""
    if installed is None:
        installed = is_installed("vllm")
    return [price(name, facts, request, inventory, policy, installed=installed) for name in RUNGS]


def with_vllm(
    facts: CheckpointFacts,
    request: Request,
    inventory: Inventory,
    policy: Policy,
    result: PlanResult,
    *,
    runner: str = "auto",
    installed: bool | None = None,
) -> PlanResult:
    """The transformers ladder's ``result`` with vLLM's rungs in front: what ``fit_result`` (and the pool's
    placement) plan with.

    ``runner`` ``auto``: on a host with a CUDA GPU and vLLM installed, a fitting vLLM rung wins (it is the engine
    people serve GPUs with), else the transformers ladder decides as before. ``vllm``: only vLLM's rungs may be
    chosen; InvalidArgument, before anything is loaded, when vLLM is not installed (naming the install command)
    or the host has no CUDA GPU. ``transformers`` and ``llama.cpp``: ``result`` unchanged.
    """
    if runner not in ("auto", "vllm") or any(r.runner == "vllm" for r in result.rungs):
        return result  # another engine asked for, or vLLM's rungs are in already
    if installed is None:
        installed = is_installed("vllm")
    if runner == "vllm":
        if not installed:
            raise InvalidArgument(f"the vllm engine was asked for but is not installed here: {INSTALL}", param="runner")
        if not inventory.gpus:
            raise InvalidArgument("the vllm engine was asked for but this host has no CUDA GPU", param="runner")
    elif not installed or not inventory.gpus:
        return result
    ours = rungs(facts, request, inventory, policy, installed=installed)
    every = (*ours, *result.rungs)
    chosen = next((r for r in ours if r.fits), None)
    if chosen is not None:
        return PlanResult(every, plan_for(chosen, request), None)
    if runner == "auto":
        return PlanResult(every, result.plan, result.nofit)
    closest = min(ours, key=lambda r: sum(max(0, n.total_bytes - n.free_bytes) for n in r.devices.values()))
    others = [f"fits as {r.name} with runner transformers ({r.where()})" for r in result.rungs if r.fits]
    fits_anyway = all(n.fits for n in closest.devices.values())
    nofit = NoFit(facts.source, closest.devices, closest.name, tuple(others), closest.blocked if fits_anyway else None)
    return PlanResult(every, None, nofit)


def plan_for(rung: Rung, request: Request) -> Plan:
    """The Plan a fitting vLLM rung becomes (what the pool starts ``vllm serve`` with)."""
    return Plan(
        rung=rung.name,
        dtype=rung.dtype,
        quantization=rung.quantization,
        context_tokens=rung.context_tokens,
        concurrency=rung.concurrency,
        max_batch_tokens=max(rung.concurrency, request.max_batch_tokens),
        devices=dict(rung.devices),
        device_map=dict(rung.device_map),
        engine=request.engine,
        runner="vllm",
    )


__all__ = [
    "COMMAND_ENV",
    "INSTALL",
    "RUNGS",
    "activation_bytes",
    "arguments",
    "checkpoint_quantization",
    "command",
    "cuda_graph_bytes",
    "kv_cache_bytes",
    "plan_for",
    "price",
    "rungs",
    "utilization",
    "with_vllm",
]
