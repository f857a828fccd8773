"""What a model needs on a device: weights, KV cache, activations and runtime, in bytes.

Pure arithmetic over CheckpointFacts; each constant says where it came from. "Measured" means in the
real runner process (``python -m memserve.runner``, ``benchmarks/estimate_accuracy.py``) on this
project's machine: 2 cores, CPU torch 2.13, transformers 5.24, glibc malloc tuned by the runner
(``runner/kernels.py: tune_allocator``). The runner checks the sum at load with a worst-case
warm-up (``runner/serve.py: fit_to_reservation``) and admits fewer sequences if it is short.

- **weights** are the header bytes, re-priced when the plan changes dtype or quantizes: bitsandbytes
  int8 stores 1 byte per weight plus one fp32 scale per output row; nf4 stores half a byte per weight
  plus one fp32 absmax per 64 weights. On CPU (``runner/quantize.py``, torch's own kernels) int8 stores
  1 byte per weight plus one fp32 scale per output row (oneDNN's kernel; the weight-only kernel's scales are in
  the compute dtype, priced at the same 4 bytes), and 4-bit half a byte per weight
  plus a scale and a zero point in the compute dtype per ``CPU_INT4_GROUP_SIZE`` weights of a row; those
  are anonymous memory, quantized one Linear at a time from the mapped file, whose pages are dropped as
  each is done, so the bf16 copy is never resident whole (the transient is one slice of rows,
  ``runner/quantize.py: SLICE_ELEMENTS``, freed before the KV cache and the first forward exist).
  Embeddings, the LM head, norms and biases stay in the compute dtype (on CPU: mapped from the file).
  Pre-quantized checkpoints are priced as stored. MoE experts stored one tensor per expert
  are fused by transformers at load into new tensors while the mapped file pages stay resident, so
  their bytes count twice (Mixtral: the issue's −47% at 2048 × 4 was this).
- **KV cache**: ``2 × layers × kv_heads × head_dim × bytes`` per token, for the tokens the paged
  cache of the continuous-batching engine really allocates: each sequence rounds up to whole
  ``KV_PAGE_TOKENS`` pages plus one page of slack (``runner/batching.py: kv_cache_blocks``), and the cache
  holds two "trash" pages more. It sizes every layer for the whole context, sliding-window layers
  included (transformers 5.24 ``PagedAttentionCache``: ``bytes_per_block`` covers all layers).
- **activations**: the peak transient of the largest forward, ``max_batch_tokens`` tokens, plus what
  the engine preallocates for it:
  - the attention mask the engine keeps per attention type (full, sliding), ``batch tokens × (readable
    tokens + batch tokens)`` in the model dtype, preallocated and written whole under full traffic; with
    two attention types each one can address twice the data pages (``mask_bytes``);
  - attention and MLP run one after the other inside a layer, so the transient is the larger of the two
    on top of the residual stream (``HIDDEN_TENSORS`` of ``tokens × hidden``):
    - the MLP holds ``facts.mlp_tensors`` ``tokens × intermediate`` tensors at once: 3 gated (gate, up,
      act·up), 4 for GPT-2's gelu_new written as a Python expression, 2 for a fused activation
      (``checkpoint/facts.py: mlp_tensors``, measured);
    - attention reads every K/V the batch's sequences hold (up to context × concurrency tokens; with only
      sliding-window layers at most the window per sequence, ``tokens_read``): the paged cache gathers them
      (``index_select``: a copy), and with a mask transformers' sdpa path repeats them to every query head
      (``repeat_kv``; GQA-in-sdpa is only used without a mask) —
      the CPU flash kernel itself adds ~8 MiB at 2,048 × 18,944 (measured), it never materialises scores;
    - eager attention (Gemma2: its soft-capping rules sdpa out) materialises the scores,
      ``tokens × keys × heads`` in the model dtype and again in fp32 for the softmax;
  - fp32 logits for the rows that sample (the engine keeps only those: ``logits_to_keep``), and the
    bf16 ones they are upcast from;
  - a measured floor per forward token (``FORWARD_BYTES_PER_TOKEN``), and per sequence served what
    was measured beyond the engine (``SERVING_BYTES_PER_SEQUENCE``).
- **the ``generate`` engine** (the fallback: static batches through ``model.generate``) is priced on its
  own: its cache grows to exactly ``context × sequences`` tokens (no pages); it preallocates no masks
  and builds one bool mask per prefill chunk; each chunk's queries read only their own row's keys, which
  are contiguous (no gather), repeated to every head under the padding mask; no per-token floor; and its
  process is 10 MiB lighter. Priced like the paged engine it was over-planned by up to 47% (tiny 2048 × 8).
- **runtime**: the runner process itself. Measured after traffic, less its weights, KV cache and
  activations: 394 MiB for the tiny demo model (280 MiB anonymous: Python, torch, transformers,
  FastAPI/uvicorn, the tokenizer; 115 MiB mapped shared libraries), 408 MiB for the small one (its
  12 layers' modules and 16k-token tokenizer add ~15 MiB), 422 MiB for the GPT-2 family checkpoint (fp32,
  12 layers: its worst-case warm-up peaked at 1,192.0 MiB, of which weights 656.6, KV 66.0, the forward
  44.9 as measured alone, masks and logits 2.8). Those were measured with torch's libraries partly in the
  page cache; on a fresh install they are wholly cached and fault-around maps ~75 MiB more of their pages
  into the runner (tiny: 461 MiB peak where 409 was measured). On a CPU with AVX-512 and native bf16 the
  same runners measure 490–500 MiB (torch's AVX-512 code paths and oneDNN's bf16 kernels).
  ``CPU_RUNTIME_BYTES`` is 500 MiB: it bounds all of these; the tiny model, where the runtime is nearly all
  of the plan, is over-planned by 11% with a warm cache and up to ~20% with a cold one. On a GPU
  add the CUDA context and cuBLAS workspace (~0.6 GiB on the GPU) and the CUDA libraries mapped into
  host RAM (~1 GiB); those GPU numbers are not yet calibrated on a lent GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from memserve.checkpoint.facts import Block, CheckpointFacts

Quantization = Literal["none", "int8", "4bit"]
Engine = Literal["continuous-batching", "generate", "image-text", "encoder"]  # encoder: runner/encoder.py
CONTINUOUS_BATCHING: Engine = "continuous-batching"
GENERATE: Engine = "generate"
IMAGE_TEXT: Engine = "image-text"  # a vision-language checkpoint: the generate engine with images (runner/vision.py)

# weights per scale and zero point of the CPU 4-bit kernel (torch's _weight_int4pack_mm_for_cpu takes 32, 64,
# 128 or 256): the smallest, for the best quality, costs 4 bytes per 32 weights in bf16 (0.125 B per weight)
CPU_INT4_GROUP_SIZE = 32

GiB = 1024**3
MiB = 1024**2
DTYPE_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}

# measured: 394–422 MiB in the runners of the models measured (see above), with torch's libraries partly in the
# page cache. A fresh install has them wholly cached, and fault-around then maps ~75 MiB more of their pages into
# the runner (file-backed RSS 186 against 112 MiB on the tiny model, 2026-11-30): 461 MiB where 409 was measured.
# On a CPU with AVX-512 and native bf16 (2026-12-01), where bf16 matmuls run oneDNN's kernels and torch takes its
# AVX-512 code paths, the runner's peak less its planned weights, KV cache and activations was 490–500 MiB with
# the libraries cached (small 512 × 1: 491, 1024 × 1: 490; 1b 1024 × 1: 499.5; benchmarks/estimate_accuracy.py)
# and 460 with them partly cached (libtorch_cpu alone 137 against ~70 MiB resident): 500 MiB bounds both machines
CPU_RUNTIME_BYTES = 500 * MiB
# The generate engine's runner has no continuous-batching manager, scheduler thread or paged-cache tables:
# measured 10 MiB below at the same shape (tiny 512 × 1: 388.5 against 398.9 MiB; small 1024 × 2: 655.8
# against 660.2 MiB).
CPU_GENERATE_RUNTIME_BYTES = CPU_RUNTIME_BYTES - 10 * MiB
GPU_RUNTIME_BYTES = 600 * MiB  # CUDA context + cuBLAS workspace on the device
GPU_HOST_RUNTIME_BYTES = 1 * GiB  # the same process's host RAM when it drives a GPU
KV_PAGE_TOKENS = 64  # tokens per KV page in the runner's paged cache (runner/batching.py: DEFAULT_PAGE_SIZE)
KV_TRASH_PAGES = 2  # pages the paged cache keeps beyond its data pages (transformers 5.24)
# residual stream, norms, q/k/v/o projections (the MLP's count is the checkpoint's: facts.mlp_tensors)
HIDDEN_TENSORS = 6
LOGITS_WIDTH = 4  # transformers upcasts logits to fp32 before sampling
# Measured, not derived: a forward never costs less than this per token. The tiny demo model's (hidden 64,
# fp32) 2,047-token forward peaks 30 MiB above its rest where its tensors account for 8 MiB: on narrow
# models what grows with the tokens rather than the width dominates (int64 index and position tensors,
# rotary tables, the flash kernel's per-thread blocks, oneDNN scratch). The small one's (hidden 768, bf16)
# 1,023-token forward, 21 MB, is its tensors.
FORWARD_BYTES_PER_TOKEN = 16 * 1024
# Measured: each sequence served at once adds ~2 MiB beyond the engine's own (its HTTP request, the
# request state and detokenizer, the streamed chunks): tiny demo runner, 4 full-context requests at once.
SERVING_BYTES_PER_SEQUENCE = 2 * MiB


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


def block_weight_bytes(
    block: Block, facts: CheckpointFacts, dtype: str, quantization: Quantization, *, mapped: bool = True
) -> int:
    """One block's weights in memory for a target dtype and quantization. ``mapped``: the block is served
    from the checkpoint's mapped files (CPU), where experts fused at load sit beside their file pages, and
    quantized by torch's CPU kernels rather than bitsandbytes (``runner/quantize.py``)."""
    if facts.prequantized:
        return block.bytes
    width = DTYPE_WIDTH[dtype]
    if quantization == "none":
        # experts stored one tensor each are fused at load into new tensors, and the mapped file pages
        # of the originals stay resident: those bytes count twice
        fused = block.split_expert_bytes * width // facts.dtype_bytes if mapped else 0
        # same dtype as stored: exact header bytes (keeps mixed-dtype checkpoints exact)
        return fused + (block.bytes if dtype == facts.dtype else block.params * width)
    rest = (block.params - block.quantizable_params) * width
    q = block.quantizable_params
    if mapped:  # runner/quantize.py: int8 per output row, 4-bit per group of a row; 4-bit scale and zero in dtype
        if quantization == "int8":  # oneDNN's int8 kernel holds fp32 row scales (the weight-only one, the dtype's)
            return rest + q + 4 * block.quantizable_rows
        return rest + q // 2 + (q // CPU_INT4_GROUP_SIZE) * 2 * width
    if quantization == "int8":
        return rest + q + 4 * block.quantizable_rows
    return rest + q // 2 + (q // 64) * 4


def paged_tokens(context_tokens: int, concurrency: int) -> int:
    """Tokens the paged KV cache allocates for ``concurrency`` sequences of ``context_tokens``: whole pages
    per sequence plus one page of slack each (``runner/batching.py: kv_cache_blocks``), plus the trash pages."""
    pages = concurrency * (math.ceil(context_tokens / KV_PAGE_TOKENS) + 1) + KV_TRASH_PAGES
    return pages * KV_PAGE_TOKENS


def kv_cache_bytes(
    facts: CheckpointFacts, dtype: str, context_tokens: int, concurrency: int, engine: Engine = CONTINUOUS_BATCHING
) -> int:
    """The paged cache as the continuous-batching engine allocates it: every layer sized for every page (no
    window cap). The ``generate`` engine's cache grows token by token to exactly what its rows hold."""
    tokens = (
        paged_tokens(context_tokens, concurrency) if engine == CONTINUOUS_BATCHING else context_tokens * concurrency
    )
    return facts.kv_bytes_per_token(DTYPE_WIDTH[dtype]) * tokens


def attention_types(facts: CheckpointFacts) -> int:
    """Layer groups with their own attention mask: full and sliding-window layers, where both exist."""
    return 2 if 0 < facts.sliding_window_layers < facts.layers else 1


def mask_bytes(facts: CheckpointFacts, dtype: str, batch_tokens: int, concurrency: int, context_tokens: int) -> int:
    """The continuous-batching engine's preallocated masks: ``batch × (readable tokens + batch)`` per attention
    type. With ``G`` layer groups (Gemma2's sliding and full layers) the cache is cut into sectors of one
    group's page, and each group's allocator can address every sector: ``G ×`` the data pages' tokens
    (transformers 5.24 ``PagedAttentionCache.max_tokens_read``; measured on the Gemma2 family checkpoint at
    2048 × 4: two masks of 2,048 × 18,944 fp32, 148 MiB each, where one group's 8,448 tokens gave 83)."""
    groups = attention_types(facts)
    data_tokens = concurrency * (math.ceil(context_tokens / KV_PAGE_TOKENS) + 1) * KV_PAGE_TOKENS
    return groups * batch_tokens * (groups * data_tokens + batch_tokens) * DTYPE_WIDTH[dtype]


def tokens_read(facts: CheckpointFacts, batch_tokens: int, concurrency: int, context_tokens: int) -> int:
    """Keys one forward of the continuous-batching engine reads: every token its sequences hold. When every layer
    slides (Mistral), each sequence reads at most its window's last ``window - 1`` cached tokens plus its new
    ones (transformers 5.24 ``SlidingAttentionCacheAllocator.get_read_indices``, the scheduler's
    ``read_cache_limit``); one full-attention layer (Gemma2's) reads everything. Measured on the Mistral family
    checkpoint (window 1,024) at 4096 × 8: priced as every token it was 1.123 × its peak."""
    read = concurrency * context_tokens
    if facts.sliding_window and facts.sliding_window_layers == facts.layers:
        read = min(read, concurrency * (facts.sliding_window - 1) + batch_tokens)
    return read


def attention_bytes(
    facts: CheckpointFacts, dtype: str, batch_tokens: int, concurrency: int, context_tokens: int
) -> int:
    """One layer's attention transient: the gathered K/V of every token the batch reads (``tokens_read``),
    repeated to every query head under a mask; eager attention adds its scores (model dtype, then fp32 for the
    softmax)."""
    width = DTYPE_WIDTH[dtype]
    read = tokens_read(facts, batch_tokens, concurrency, context_tokens)
    gathered = 2 * read * facts.kv_heads * facts.head_dim * width
    repeated = 2 * read * facts.heads * facts.head_dim * width if facts.heads != facts.kv_heads else 0
    scores = batch_tokens * read * facts.heads * (width + 4) if facts.eager_attention else 0
    query = batch_tokens * facts.heads * facts.head_dim * width * 2  # q and the attention output
    return gathered + repeated + scores + query


def generate_attention_bytes(
    facts: CheckpointFacts, dtype: str, batch_tokens: int, concurrency: int, context_tokens: int
) -> int:
    """One layer's attention transient in the ``generate`` engine: its rows are one left-padded batch, each
    chunk's queries read only their own row's keys, which sit contiguous in the cache (no gather). With the
    padding mask, sdpa repeats them to every query head; the mask itself is a bool per query and key."""
    width = DTYPE_WIDTH[dtype]
    read = concurrency * context_tokens
    repeated = 2 * read * facts.heads * facts.head_dim * width if facts.heads != facts.kv_heads else 0
    mask = batch_tokens * context_tokens
    scores = batch_tokens * context_tokens * facts.heads * (width + 4) if facts.eager_attention else 0
    query = batch_tokens * facts.heads * facts.head_dim * width * 2
    return repeated + mask + scores + query


def activation_bytes(
    facts: CheckpointFacts,
    dtype: str,
    batch_tokens: int,
    concurrency: int,
    context_tokens: int,
    engine: Engine = CONTINUOUS_BATCHING,
) -> int:
    """Peak transient of one forward over ``batch_tokens`` tokens, plus what the engine preallocates for it:
    the masks, the larger of attention and MLP over the residual stream, the sampled rows' logits, and
    what serving each sequence costs beside the engine.

    The ``generate`` engine preallocates nothing: it builds each chunk's mask as it goes, and has no
    per-token floor (``FORWARD_BYTES_PER_TOKEN`` was the continuous-batching engine's per-token index
    and position tensors; the tiny model's 8 × 2,048-token batch in ``generate`` stayed within its tensors)."""
    width = DTYPE_WIDTH[dtype]
    ffn = facts.intermediate_size * (facts.experts_per_token or 1)
    mlp = batch_tokens * facts.mlp_tensors * ffn * width
    hidden = batch_tokens * HIDDEN_TENSORS * facts.hidden_size * width
    logits = concurrency * facts.vocab_size * (LOGITS_WIDTH + width)
    serving = concurrency * SERVING_BYTES_PER_SEQUENCE
    if engine in (GENERATE, IMAGE_TEXT):
        attention = generate_attention_bytes(facts, dtype, batch_tokens, concurrency, context_tokens)
        return hidden + max(mlp, attention) + logits + serving
    attention = attention_bytes(facts, dtype, batch_tokens, concurrency, context_tokens)
    masks = mask_bytes(facts, dtype, batch_tokens, concurrency, context_tokens)
    forward = max(hidden + max(mlp, attention), batch_tokens * FORWARD_BYTES_PER_TOKEN)
    return masks + forward + logits + serving


def batch_tokens_for(context_tokens: int, concurrency: int, max_batch_tokens: int) -> int:
    """Tokens in the largest forward: the prefill chunk, never more than all sequences' contexts."""
    return max(concurrency, min(context_tokens * concurrency, max_batch_tokens))
