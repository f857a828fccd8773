"""What a model needs on a device: weights, KV cache, activations and runtime, in bytes.

Pure arithmetic over CheckpointFacts; the constants below say where each number came from.

- **weights** are the header bytes, re-priced when the plan changes dtype or quantizes: bitsandbytes
  int8 stores 1 byte per weight plus one fp32 scale per output row; nf4 stores half a byte per weight
  plus one fp32 absmax per 64 weights. Embeddings, the LM head, norms and biases stay in the compute
  dtype. Pre-quantized checkpoints are priced as stored.
- **KV cache**: ``2 × layers × kv_heads × head_dim × bytes`` per token, times context × concurrency,
  sliding-window layers capped at the window.
- **activations**: the peak transient of one forward over ``max_batch_tokens`` tokens (the prefill
  chunk): the MLP holds about three ``tokens × intermediate`` tensors at once and the residual stream
  and attention projections a few ``tokens × hidden`` ones; plus fp32 logits for the rows whose next
  token is sampled; plus attention's workspace: with a mask (padding, chunked prefill, decode),
  transformers' sdpa path repeats one layer's K and V to every query head (``repeat_kv``), and the
  continuous-batching engine preallocates a ``tokens × (cache tokens + tokens)`` mask in the model dtype.
- **runtime**: the process itself. Measured here (benchmarks/estimate_accuracy.py on the tiny demo
  model): Python + torch + transformers after a forward is ≈ 0.35 GiB of RSS on CPU, 0.25 GiB of it
  anonymous and 0.1 GiB mapped shared libraries. On a GPU add the CUDA context and cuBLAS workspace (~0.6 GiB on
  the GPU) and the CUDA libraries mapped into host RAM (~1 GiB); those GPU numbers are not yet
  calibrated on a lent GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from memserve.checkpoint.facts import Block, CheckpointFacts

Quantization = Literal["none", "int8", "4bit"]

GiB = 1024**3
MiB = 1024**2
DTYPE_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}

CPU_RUNTIME_BYTES = 350 * MiB
GPU_RUNTIME_BYTES = 600 * MiB  # CUDA context + cuBLAS workspace on the device
GPU_HOST_RUNTIME_BYTES = 1 * GiB  # the same process's host RAM when it drives a GPU
# MLP: gate, up and act(gate)·up can be alive together; residual stream, norms, q/k/v/o projections
MLP_TENSORS = 3
HIDDEN_TENSORS = 6
LOGITS_WIDTH = 4  # transformers upcasts logits to fp32 before sampling


@dataclass(frozen=True)
class DeviceNeed:
    """Bytes a plan reserves on one device, by kind, next to what the device has free for it."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    activation_bytes: int = 0
    runtime_bytes: int = 0
    free_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.free_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_bytes": self.activation_bytes,
            "runtime_bytes": self.runtime_bytes,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
        }


def block_weight_bytes(block: Block, facts: CheckpointFacts, dtype: str, quantization: Quantization) -> int:
    """One block's weights in memory for a target dtype and quantization."""
    if facts.prequantized:
        return block.bytes
    width = DTYPE_WIDTH[dtype]
    if quantization == "none":
        # same dtype as stored: exact header bytes (keeps mixed-dtype checkpoints exact)
        return block.bytes if dtype == facts.dtype else block.params * width
    rest = (block.params - block.quantizable_params) * width
    q = block.quantizable_params
    if quantization == "int8":
        return rest + q + 4 * block.quantizable_rows
    return rest + q // 2 + (q // 64) * 4


def weight_bytes(facts: CheckpointFacts, dtype: str, quantization: Quantization) -> int:
    return sum(block_weight_bytes(b, facts, dtype, quantization) for b in facts.blocks)


def kv_cache_bytes(facts: CheckpointFacts, dtype: str, context_tokens: int, concurrency: int) -> int:
    return facts.kv_bytes(context_tokens, DTYPE_WIDTH[dtype]) * concurrency


def activation_bytes(
    facts: CheckpointFacts, dtype: str, batch_tokens: int, concurrency: int, context_tokens: int
) -> int:
    """Peak transient of one forward over ``batch_tokens`` tokens: MLP and residual stream, the
    sampled rows' logits, and attention's repeated K/V and mask for one layer."""
    width = DTYPE_WIDTH[dtype]
    ffn = facts.intermediate_size * (facts.experts_per_token or 1)
    per_token = (MLP_TENSORS * ffn + HIDDEN_TENSORS * facts.hidden_size) * width
    logits = concurrency * facts.vocab_size * LOGITS_WIDTH
    repeated_kv = 2 * concurrency * context_tokens * facts.heads * facts.head_dim * width
    if facts.heads == facts.kv_heads:
        repeated_kv = 0
    # the continuous-batching engine preallocates a (batch tokens × (cache tokens + batch tokens)) mask
    # in the model dtype (transformers 5.23, sdpa/eager paged attention)
    mask = batch_tokens * (context_tokens * concurrency + batch_tokens) * width
    return batch_tokens * per_token + logits + repeated_kv + mask


def batch_tokens_for(context_tokens: int, concurrency: int, max_batch_tokens: int) -> int:
    """Tokens in the largest forward: the prefill chunk, never more than all sequences' contexts."""
    return max(concurrency, min(context_tokens * concurrency, max_batch_tokens))
