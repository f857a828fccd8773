"""The encoder plan: what an embedding or classification runner needs, in bytes. Pure arithmetic.

An encoder runner (``runner/encoder.py``) holds no KV cache: each batch is one forward over at most
``max_batch_tokens`` padded tokens and then nothing of it is kept. So a device needs:

- **weights**: the header bytes (``CheckpointFacts.weights_bytes``, adapters included), in the checkpoint's
  dtype (kept on the GPU too: an encoder's embeddings are compared within 1e-5, and its weights are small);
- **activations** of the heaviest batch the budget admits, ``rows × length`` tokens with ``length`` the
  model's input limit (``rows = max(1, max_batch_tokens // length)``; attention grows with length², so the
  longest inputs cost most for a given budget): the residual stream (``HIDDEN_TENSORS`` of ``tokens ×
  hidden``), the MLP's ``mlp_tensors`` of ``tokens × intermediate`` (attention and MLP run one after the
  other), the attention mask transformers expands to ``rows × length × length``, and the scores per head
  only where attention materialises them (eager attention; sdpa's CPU kernel takes the padding mask
  without them: the small BERT's 4 × 512 warm-up peaked 42 MiB above its rest, its hidden states and MLP
  being 44 MiB and its scores would have been 100 MB more); never less than ``FORWARD_BYTES_PER_TOKEN``
  per token; plus ``SERVING_BYTES_PER_SEQUENCE`` per request admitted at once (the plan's concurrency), and
  one request of ``MAX_INPUTS`` inputs' answers as Python floats and JSON text, ``RESULT_BYTES_PER_VALUE``
  per value (measured: 2,048 inputs of the small BERT's 384 dimensions raised its peak by 42 MiB);
- **runtime**: the generation runner's process without its continuous-batching manager
  (``CPU_GENERATE_RUNTIME_BYTES``), and on a GPU its CUDA context as the planner prices it.

Two rungs, ``gpu`` then ``cpu`` (the planner's ladder; quantization and splitting buy nothing here).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from memserve.checkpoint.encoders import EncoderFacts
from memserve.checkpoint.facts import CheckpointFacts
from memserve.memory.estimate import (
    CPU_GENERATE_RUNTIME_BYTES,
    DTYPE_WIDTH,
    FORWARD_BYTES_PER_TOKEN,
    GPU_HOST_RUNTIME_BYTES,
    GPU_RUNTIME_BYTES,
    HIDDEN_TENSORS,
    SERVING_BYTES_PER_SEQUENCE,
    DeviceNeed,
    Engine,
)
from memserve.memory.inventory import Inventory
from memserve.memory.planner import PlanResult, Policy, Request, Rung, fit_words, ladder, placement_blocked
from memserve.wire.encoders import MAX_INPUTS

__all__ = ["ENCODER", "ENCODER_RUNGS", "EncoderNeed", "encoder_batch_shape", "encoder_need", "encoder_plan"]

ENCODER: Engine = "encoder"  # Plan.engine of an encoder runner
ENCODER_RUNGS = ("gpu", "cpu")
ENCODER_SCORES = 2
"""Score tensors per head alive at once (the scores and their softmax) where attention is eager."""
RESULT_BYTES_PER_VALUE = 56
"""One value of an answer while it is built: a Python float (24 B) and its list slot (8 B), ~20 B of JSON text
and the fp32 row it came from (4 B)."""


@dataclass(frozen=True)
class EncoderNeed:
    """The parts of an encoder's need on one device, before the device's free memory is known."""

    weights_bytes: int
    activation_bytes: int
    runtime_bytes: int
    rows: int
    length: int

    def on(self, free_bytes: int) -> DeviceNeed:
        return DeviceNeed(
            weights_bytes=self.weights_bytes,
            kv_cache_bytes=0,
            activation_bytes=self.activation_bytes,
            runtime_bytes=self.runtime_bytes,
            free_bytes=free_bytes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes,
            "activation_bytes": self.activation_bytes,
            "runtime_bytes": self.runtime_bytes,
            "rows": self.rows,
            "length": self.length,
        }


def encoder_batch_shape(max_tokens: int, max_batch_tokens: int) -> tuple[int, int]:
    """(rows, length) of the heaviest batch: as many inputs of the model's limit as the budget holds."""
    return max(1, max_batch_tokens // max_tokens), max_tokens


def encoder_need(
    facts: CheckpointFacts,
    encoder: EncoderFacts,
    *,
    dtype: str,
    max_batch_tokens: int,
    concurrency: int,
    gpu: bool = False,
) -> EncoderNeed:
    """Weights, activations and runtime of an encoder runner (the module docstring says what each holds)."""
    width = DTYPE_WIDTH[dtype]
    rows, length = encoder_batch_shape(encoder.max_tokens, max_batch_tokens)
    tokens = rows * length
    hidden = tokens * HIDDEN_TENSORS * facts.hidden_size * width
    mlp = tokens * facts.mlp_tensors * facts.intermediate_size * width
    mask = rows * length * length * width
    scores = ENCODER_SCORES * rows * facts.heads * length * length * width if facts.eager_attention else 0
    forward = max(hidden + max(mlp, mask + scores), tokens * FORWARD_BYTES_PER_TOKEN)
    values = encoder.dimensions if encoder.task == "embed" else len(encoder.labels)
    serving = concurrency * SERVING_BYTES_PER_SEQUENCE + MAX_INPUTS * values * RESULT_BYTES_PER_VALUE
    weights = facts.weights_bytes * width // max(1, facts.dtype_bytes)
    runtime = GPU_RUNTIME_BYTES if gpu else CPU_GENERATE_RUNTIME_BYTES
    return EncoderNeed(weights, forward + serving, runtime, rows, length)


def encoder_plan(
    facts: CheckpointFacts, encoder: EncoderFacts, request: Request, inventory: Inventory, policy: Policy
) -> PlanResult:
    """The first of ``gpu`` and ``cpu`` where the encoder fits, as a Plan with engine ``encoder``.

    The plan's ``context_tokens`` is the model's input limit, and its ``max_batch_tokens`` the request's budget
    (at least one whole input): the encoder batches inputs of many requests up to it, whatever the concurrency.
    """
    context = min(request.context_tokens, encoder.max_tokens)
    budget = max(request.max_batch_tokens, encoder.max_tokens)
    request = replace(request, context_tokens=context, max_batch_tokens=budget, engine=ENCODER)
    cpu = inventory.cpu
    dtype = facts.dtype

    def price(name: str, context_tokens: int, request: Request) -> Rung:
        gpus = inventory.gpus
        if name == "gpu" and not gpus:
            return Rung(
                name,
                False,
                False,
                "no CUDA GPU on this host",
                dtype,
                "none",
                context_tokens,
                request.concurrency,
                blocked="there is no CUDA GPU on this host",
            )
        blocked = placement_blocked(name, policy)
        need = encoder_need(
            facts,
            encoder,
            dtype=dtype,
            max_batch_tokens=budget,
            concurrency=request.concurrency,
            gpu=name == "gpu",
        )
        if name == "gpu":
            device = gpus[0]
            needs = {
                device.name: need.on(device.usable_bytes),
                cpu.name: DeviceNeed(runtime_bytes=GPU_HOST_RUNTIME_BYTES, free_bytes=cpu.usable_bytes),
            }
        else:
            device = cpu
            needs = {cpu.name: need.on(cpu.usable_bytes)}
        fits, why = fit_words(needs, blocked)
        device_map = {block.name: device.name for block in facts.blocks}
        return Rung(
            name,
            fits and blocked is None,
            blocked is None,
            why,
            dtype,
            "none",
            context_tokens,
            request.concurrency,
            needs,
            device_map,
            blocked,
        )

    result = ladder(facts.source, ENCODER_RUNGS, price, request, policy, dtype=dtype)
    if result.plan is None:
        return result
    return replace(result, plan=replace(result.plan, max_batch_tokens=budget))
