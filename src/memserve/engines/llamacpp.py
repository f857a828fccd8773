"""llama.cpp's ``llama-server`` as a runner kind: GGUF models priced from their header, and the command line.

Pure functions, tested as tables (no process, no file read except locating the model in ``arguments``):

- ``plan(facts, request, inventory, policy)`` prices the rungs llama.cpp can take — ``gpu`` (every layer
  offloaded, ``-ngl`` = layers + 1), ``gpu-cpu-split`` (the last layers on the GPU, as ``-ngl N`` places
  them), ``cpu`` and ``smaller-context`` — and chooses the first that fits, as the planner does.
- ``arguments(name, launch, host=, port=)`` turns the chosen plan into ``llama-server``'s argv.

What llama.cpp holds, per its own code (llama.cpp as vendored in llama-cpp-python 0.3.36) and measured
here (docs/gguf.md):

- **weights**: the GGUF tensors as stored. llama.cpp maps the file (``CPU_Mapped model buffer``), so on CPU they
  count as the transformers runner's mapped weights do: file pages resident once touched (the warm-up
  touches all of them). Quantized types are not expanded; nothing is re-priced.
- **KV cache**: ``n_layer × n_ctx × (n_embd_k_gqa + n_embd_v_gqa) × 2`` bytes (f16 cache, the default), where
  ``n_ctx`` is what llama.cpp really allocates: the requested ``context × slots`` padded to 256 tokens, then
  split per slot and each slot's share padded to 256 again (``llama-context.cpp``).
- **activations**: the compute buffer of the worst-case graph (``min(n_ctx, n_ubatch)`` tokens; llama-server
  asks for one output per slot), the output buffer (one token's logits per slot) and the CPU backend's work
  buffer.
- **runtime**: the ``llama-server`` process itself (code, threads, HTTP server, vocabulary, slots), measured.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

from memserve.checkpoint.gguf import GgufFacts
from memserve.checkpoint.locate import find_gguf
from memserve.errors import CheckpointError, InvalidArgument, RunnerFailed
from memserve.memory.estimate import GPU_HOST_RUNTIME_BYTES, GPU_RUNTIME_BYTES, DeviceNeed
from memserve.memory.fit import PlanFile
from memserve.memory.inventory import Device, Inventory
from memserve.memory.planner import (
    PlanResult,
    Policy,
    Request,
    Rung,
    RunnerKind,
    batch_tokens_for,
    fit_words,
    ladder,
    placement_blocked,
    validate_request,
)

__all__ = [
    "COMMAND_ENV",
    "RUNGS",
    "arguments",
    "compute_bytes",
    "executable",
    "gpu_layers",
    "kv_cache_bytes",
    "kv_tokens",
    "output_bytes",
    "plan",
    "runtime_bytes",
    "slot_tokens",
    "work_bytes",
]

MiB = 1024**2
RUNNER: RunnerKind = "llama.cpp"
RUNGS = ("gpu", "gpu-cpu-split", "cpu", "smaller-context")
COMMAND_ENV = "MEMSERVE_LLAMA_SERVER_COMMAND"
INSTALL_HINT = (
    "install llama.cpp so that llama-server is on PATH (a release build, or from memserve's source: "
    "scripts/build-llama-server.sh), or set MEMSERVE_LLAMA_SERVER_COMMAND to its path"
)
CTX_PAD_TOKENS = 256  # llama.cpp pads the context, and each slot's share of it, to this (llama-context.cpp)
KV_CACHE_BYTES = 2  # f16 K and V, llama.cpp's default cache type
LOGITS_BYTES = 4  # fp32 logits
# The compute buffer, fitted to what llama-server reports ("CPU compute buffer size") for the tiny and small
# demo models at 256-2,048 batch tokens and 512-4,096 cells, within 0.05 MiB: per token, four ``n_embd``-wide
# fp32 tensors (the residual stream and what attention writes into it) beside the larger of the FFN's three
# ``n_ff``-wide ones and the logits of one output per slot, plus its inputs (positions, output ids); and the
# f16 attention mask over one slot's cells.
HIDDEN_TENSORS = 4
FFN_TENSORS = 3
INPUT_BYTES_PER_TOKEN = 32
MASK_BYTES = 2
# Measured (VmHWM after a full-context request per slot, less llama.cpp's buffers, 2 threads): the process's
# own 17.5-18.2 MiB (code, libraries, threads, HTTP server), 205 B per vocabulary entry (the tokenizer's
# tables), and per slot 0.34 MiB with a 1k vocabulary, 0.5 with 16k (its state and sampler).
CPU_RUNTIME_BYTES = 18 * MiB + MiB // 2
RUNTIME_BYTES_PER_VOCAB = 256
SLOT_BYTES = 320 * 1024
SLOT_BYTES_PER_VOCAB = 16
# A GGUF LoRA adapter: its tensors (priced as weights, ``facts.with_adapters``) and what loading and serving it
# adds beyond them. Measured (VmHWM after a request on each adapter, against the base alone, tiny demo, 1
# thread): 29 KiB adapters +0.81 MiB for one, +1.9 for two, +3.6 for four; a 562 KiB one (rank 64 on every
# Linear) +1.34 MiB; a 4.4 MiB one (rank 512) +5.8 MiB, two of them +11.8: ~1 MiB each and a third more of
# its bytes again. Priced as half its bytes again and 1 MiB, over every one of those.
LORA_EXTRA_FRACTION = 0.5
LORA_FIXED_BYTES = MiB
# The CPU backend's work buffer: a batch of activations converted for the matmul of the widest input
# (2 bytes an element, f16/bf16/q8 dot types): measured +0.9 MiB on the tiny model from 512 to 2,048 tokens.
WORK_BYTES = 2


# --------------------------------------------------------------------------------------------- pricing


def kv_tokens(context_tokens: int, slots: int) -> int:
    """Cells llama.cpp allocates for ``slots`` sequences of ``context_tokens`` (``-c context×slots -np slots``)."""
    return slot_tokens(context_tokens, slots) * slots


def slot_tokens(context_tokens: int, slots: int) -> int:
    """One slot's cells: the total padded to 256 tokens, split per slot, then padded to 256 again."""
    total = math.ceil(context_tokens * slots / CTX_PAD_TOKENS) * CTX_PAD_TOKENS
    return math.ceil((total // slots) / CTX_PAD_TOKENS) * CTX_PAD_TOKENS


def kv_cache_bytes(facts: GgufFacts, context_tokens: int, slots: int) -> int:
    """``n_layer × n_ctx × (n_embd_k_gqa + n_embd_v_gqa) × 2``: every layer, every cell, f16."""
    return facts.kv_bytes_per_token(KV_CACHE_BYTES) * kv_tokens(context_tokens, slots)


def compute_bytes(facts: GgufFacts, batch_tokens: int, context_tokens: int, slots: int) -> int:
    """llama.cpp's compute buffer: its worst-case graph of ``min(batch, cells)`` tokens (see the constants)."""
    tokens = min(batch_tokens, kv_tokens(context_tokens, slots))
    hidden = HIDDEN_TENSORS * facts.hidden_size * tokens * 4 + INPUT_BYTES_PER_TOKEN * tokens
    # a mixture of experts computes the FFN of each expert a token is routed to, side by side
    ffn = FFN_TENSORS * facts.intermediate_size * (facts.experts_per_token or 1) * tokens * 4
    logits = facts.vocab_size * slots * LOGITS_BYTES
    mask = slot_tokens(context_tokens, slots) * tokens * MASK_BYTES
    return hidden + max(ffn, logits) + mask


def output_bytes(facts: GgufFacts, slots: int) -> int:
    """The output buffer: one token's logits per slot (``llama_context::output_reserve``)."""
    return facts.vocab_size * slots * LOGITS_BYTES


def work_bytes(facts: GgufFacts, batch_tokens: int, context_tokens: int, slots: int) -> int:
    """The CPU backend's matmul work buffer for one batch (see ``WORK_BYTES``)."""
    tokens = min(batch_tokens, kv_tokens(context_tokens, slots))
    return tokens * (facts.hidden_size + facts.intermediate_size) * WORK_BYTES


def runtime_bytes(facts: GgufFacts, slots: int) -> int:
    """llama-server itself on CPU: the process, its vocabulary, its slots, and what its LoRA adapters add beyond
    their tensors."""
    per_slot = SLOT_BYTES + SLOT_BYTES_PER_VOCAB * facts.vocab_size
    adapters = sum(int(a.weights_bytes * LORA_EXTRA_FRACTION) + LORA_FIXED_BYTES for a in facts.adapters)
    return CPU_RUNTIME_BYTES + RUNTIME_BYTES_PER_VOCAB * facts.vocab_size + slots * per_slot + adapters


def _validate(facts: GgufFacts, request: Request) -> None:
    """The checks every plan makes, and GGUF's own: its weights are served as stored."""
    validate_request(facts, request)
    if request.quantization not in ("auto", "none"):
        raise InvalidArgument(
            f"--quantization {request.quantization} does not apply to a GGUF model: llama.cpp serves its weights "
            f"as stored ({facts.file_type}); pick a GGUF file of the quantization you want (or make one with "
            "llama-quantize)",
            param="quantization",
        )


def _needs(
    facts: GgufFacts, request: Request, context_tokens: int, cpu: Device, gpu: Device | None, *, split: bool
) -> tuple[dict[str, DeviceNeed], dict[str, str]]:
    """Bytes per device, and where each block sits: on ``cpu`` alone (``gpu`` None), everything but the token
    embeddings on ``gpu`` (``split`` False), or as many of the top blocks as ``gpu`` holds (``split`` True).

    llama.cpp offloads the last ``-ngl`` layers, and the output layer when ``-ngl`` exceeds the layer count;
    the token embeddings always stay in host memory. A split whose GPU cannot hold even the first block
    still places it there, so the rung shows how much is missing.
    """
    slots = request.concurrency
    batch = batch_tokens_for(context_tokens, slots, request.max_batch_tokens)
    kv_per_layer = kv_cache_bytes(facts, context_tokens, slots) // max(1, facts.layers)
    compute = compute_bytes(facts, batch, context_tokens, slots)
    device_map = {b.name: cpu.name for b in facts.blocks}
    gpu_weights = gpu_kv = 0
    if gpu is not None:
        fixed = compute + GPU_RUNTIME_BYTES
        top_down = [b for b in reversed(facts.blocks) if b.name != "embed"]
        for index, block in enumerate(top_down):
            kv = kv_per_layer if block.name.startswith("layer.") else 0
            if split and index > 0 and fixed + gpu_weights + gpu_kv + block.bytes + kv > gpu.usable_bytes:
                break
            gpu_weights += block.bytes
            gpu_kv += kv
            device_map[block.name] = gpu.name
    on_cpu = [b for b in facts.blocks if device_map[b.name] == cpu.name]
    cpu_layers = sum(1 for b in on_cpu if b.name.startswith("layer."))
    # the host computes the whole graph when it holds a layer; otherwise only the embeddings' rows
    if gpu is None or cpu_layers:
        cpu_compute = compute + work_bytes(facts, batch, context_tokens, slots)
    else:
        cpu_compute = facts.hidden_size * batch * 4
    needs = {
        cpu.name: DeviceNeed(
            sum(b.bytes for b in on_cpu),
            kv_per_layer * cpu_layers,
            cpu_compute + output_bytes(facts, slots),
            runtime_bytes(facts, slots) if gpu is None else GPU_HOST_RUNTIME_BYTES,
            cpu.usable_bytes,
        )
    }
    if gpu is not None:
        needs = {gpu.name: DeviceNeed(gpu_weights, gpu_kv, compute, GPU_RUNTIME_BYTES, gpu.usable_bytes), **needs}
    return needs, device_map


def gpu_layers(device_map: Mapping[str, str]) -> int:
    """``-ngl``: the layers placed off the host, plus one for the output layer when it is placed there too."""
    off = {block for block, device in device_map.items() if device != "cpu"}
    return sum(1 for block in off if block.startswith("layer.")) + (1 if "head" in off else 0)


def _price(
    name: str, facts: GgufFacts, request: Request, inventory: Inventory, policy: Policy, context_tokens: int
) -> Rung:
    gpus = inventory.gpus
    on_gpu = name != "cpu"
    if on_gpu and not gpus:
        return Rung(
            name,
            False,
            False,
            "no CUDA GPU on this host",
            facts.file_type,
            "none",
            context_tokens,
            request.concurrency,
            blocked="there is no CUDA GPU on this host",
            runner=RUNNER,
        )
    blocked = placement_blocked(name, policy)
    gpu = gpus[0] if on_gpu else None  # one GPU: llama.cpp's split across several is not priced
    needs, device_map = _needs(facts, request, context_tokens, inventory.cpu, gpu, split=name == "gpu-cpu-split")
    fits, why = fit_words(needs, blocked)
    if on_gpu:
        why += f"; -ngl {gpu_layers(device_map)}"
    return Rung(
        name,
        fits and blocked is None,
        blocked is None,
        why,
        facts.file_type,
        "none",
        context_tokens,
        request.concurrency,
        needs,
        device_map,
        blocked,
        runner=RUNNER,
    )


def plan(facts: GgufFacts, request: Request, inventory: Inventory, policy: Policy | None = None) -> PlanResult:
    """Price llama.cpp's rungs for a GGUF model and choose the first that fits; otherwise a NoFit."""
    _validate(facts, request)
    rules = policy or Policy()

    def price(name: str, context_tokens: int, request: Request) -> Rung:
        return _price(name, facts, request, inventory, rules, context_tokens)

    return ladder(
        facts.source,
        RUNGS[:-1],
        price,
        request,
        rules,
        dtype=facts.file_type,
        runner=RUNNER,
        hints=(f"a smaller quantization of the model than {facts.file_type} (another GGUF file)",),
    )


# ------------------------------------------------------------------------------------------- arguments


def executable(environ: dict[str, str] | None = None) -> list[str]:
    """The command that starts llama-server: ``MEMSERVE_LLAMA_SERVER_COMMAND`` (split as a shell would), else
    ``llama-server`` on PATH; RunnerFailed naming the install steps when there is neither."""
    env = os.environ if environ is None else environ
    command = env.get(COMMAND_ENV, "").strip()
    if command:
        argv = shlex.split(command)
        found = shutil.which(argv[0], path=env.get("PATH"))
        if found is None:
            raise RunnerFailed(f"{COMMAND_ENV}={command!r} names {argv[0]}, which is not an executable; {INSTALL_HINT}")
        return [found, *argv[1:]]
    found = shutil.which("llama-server", path=env.get("PATH"))
    if found is None:
        raise RunnerFailed(f"llama-server is not installed (not on PATH); {INSTALL_HINT}")
    return [found]


def arguments(
    name: str,
    launch: PlanFile,
    *,
    host: str,
    port: int,
    threads: int | None = None,
    environ: dict[str, str] | None = None,
) -> list[str]:
    """llama-server's argv for a llama.cpp plan: the model under the pool's ``name``, one slot per sequence.

    ``threads`` is the runner's share of the cores (llama.cpp's default, all physical cores, when None).
    Every flag is checked against the built binary's ``--help`` (tests/engines/test_llamacpp_server.py).
    ``--fit off`` and ``--cache-ram 0`` keep llama.cpp from resizing what memserve planned or caching prompts
    in host memory beyond it. The plan's GGUF LoRA adapters are loaded with ``--lora``, ids in their order; the
    gateway sets each request's scales (``lora``), 1 for the adapter it names and 0 for the others.
    """
    plan = launch.plan
    if plan.runner != RUNNER:
        raise InvalidArgument(
            f"the plan for {name} runs on {plan.runner}, not {RUNNER}; plan it again with memserve fit"
        )
    model = find_gguf(launch.source)
    if model is None:
        raise CheckpointError(f"{launch.source}: not a GGUF model (a .gguf file, or a folder holding one)")
    slots = plan.concurrency
    argv = [
        *executable(environ),
        "--model", str(model),
        "--alias", name,
        "--host", host,
        "--port", str(port),
        "--ctx-size", str(plan.context_tokens * slots),
        "--parallel", str(slots),
        "--cont-batching",
        "--batch-size", str(plan.max_batch_tokens),
        "--ubatch-size", str(plan.max_batch_tokens),
        "--gpu-layers", str(gpu_layers(plan.device_map)),
        "--fit", "off",
        "--cache-ram", "0",
        "--no-webui",
    ]  # fmt: skip
    if launch.adapters:  # one comma-separated list (a repeated --lora is deprecated); ids 0, 1, ... in this order
        argv += ["--lora", ",".join(str(Path(a).expanduser().resolve()) for _, a in launch.adapters)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv
