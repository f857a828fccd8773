"""Deterministic demo checkpoints, so tests and benchmarks never reach the hub.

``write_demo_model`` writes a real Hugging Face checkpoint directory (config, generation config,
sharded safetensors, a locally trained tokenizer with a ChatML template) that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline.

Why it is built the way it is:

- Tensor names and shapes come from instantiating the model on the ``meta`` device, so they are
  exactly what the installed transformers expects; tied ``lm_head.weight`` is left out, as
  ``save_pretrained`` does.
- Each tensor is drawn on its own from a generator seeded by ``(seed, name)``, cast to the target
  dtype, added to the current shard, and dropped once its shard is written: peak memory is about one
  shard plus one fp32 tensor, never a second copy of the model. The same arguments give
  byte-identical files; the fp32 and bf16 builds of one size and seed hold the same weights up to
  rounding.
- The tiny model is initialised with a large std: at std 0.02 a 64-wide random model puts all its
  mass on one token, and greedy output that repeats one id tests nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from memserve.checkpoint.demo_tokenizer import ENDOFTEXT, IM_END, save_tokenizer, train_tokenizer
from memserve.errors import InvalidArgument

SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 2048,
    },
    "small": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 16384,
        "max_position_embeddings": 4096,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 22,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}
"""Config dimensions per size (``vocab_size`` is the tokenizer's target, which it reaches exactly)."""

ARCHS = ("llama", "qwen2")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_DEFAULT_DTYPE = {"tiny": "float32", "small": "bfloat16", "1b": "bfloat16"}
_INIT_STD = {"tiny": 0.3, "small": 0.02, "1b": 0.02}
_SHARD_LIMIT_BYTES = {"tiny": 512 * 1024, "small": 128 * 1024**2, "1b": 1024**3}
"""Proportional to the size, so the default tiny build has two shards and sharded loading is tested."""

_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class DemoModelInfo:
    """What ``write_demo_model`` wrote: the record the CLI prints and tests check."""

    path: Path
    arch: str
    size: str
    dtype: str
    params: int
    weights_bytes: int
    shards: int
    seconds: float


def write_demo_model(
    path: Path,
    *,
    size: str = "tiny",
    arch: str = "llama",
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
) -> DemoModelInfo:
    """Write a deterministic ``arch`` checkpoint of ``size`` into ``path`` and say what was written.

    ``dtype`` defaults to float32 for tiny and bfloat16 otherwise. A non-empty ``path`` is refused
    unless ``force``; then only checkpoint files (config, tokenizer, safetensors, index) are replaced
    and anything else in the directory is left alone. The checkpoint is built in a sibling directory
    and moved in at the end, with ``config.json`` last, so an interrupted build never looks complete.
    """
    started = time.perf_counter()
    dtype = _check_args(size, arch, dtype, seed)
    path = Path(path)
    _check_target(path, force=force)

    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        dims = SIZES[size]
        vocab_size = save_tokenizer(
            train_tokenizer(dims["vocab_size"]), staging, model_max_length=dims["max_position_embeddings"]
        )
        config = _make_config(size, arch, dtype, vocab_size)
        params, shards = _write_weights(staging, config, size=size, dtype=DTYPES[dtype], seed=seed)
        _write_configs(staging, config)
        _move_into(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DemoModelInfo(
        path=path,
        arch=arch,
        size=size,
        dtype=dtype,
        params=params,
        weights_bytes=params * DTYPES[dtype].itemsize,
        shards=shards,
        seconds=time.perf_counter() - started,
    )


def _check_args(size: str, arch: str, dtype: str | None, seed: int) -> str:
    if size not in SIZES:
        raise InvalidArgument(f"unknown size {size!r}: expected one of {', '.join(SIZES)}", param="size")
    if arch not in ARCHS:
        raise InvalidArgument(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}", param="arch")
    dtype = _DEFAULT_DTYPE[size] if dtype is None else dtype
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}", param="dtype")
    if not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be between 0 and {2**32 - 1}, got {seed}", param="seed")
    return dtype


def _check_target(path: Path, *, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"{path} exists and is not a directory; choose a directory path", param="path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InvalidArgument(
            f"{path} is not empty; choose an empty or new directory, or pass --force to replace the "
            "checkpoint files in it",
            param="path",
        )


def _make_config(size: str, arch: str, dtype: str, vocab_size: int) -> object:
    """A ``LlamaConfig``/``Qwen2Config``; Qwen2 ties embeddings and has q/k/v biases by design."""
    from transformers import LlamaConfig, Qwen2Config

    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    # The tokenizer was built by us, so its special ids are known without loading it back.
    from memserve.checkpoint.demo_tokenizer import SPECIAL_TOKENS

    pad_id, eos_id = SPECIAL_TOKENS.index(ENDOFTEXT), SPECIAL_TOKENS.index(IM_END)
    return config_class(
        **{**SIZES[size], "vocab_size": vocab_size},
        initializer_range=_INIT_STD[size],
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=dtype,
    )
