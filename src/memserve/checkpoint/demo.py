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
  shard plus one fp32 tensor per worker thread, never a second copy of the model. The same arguments give
  byte-identical files; the fp32 and bf16 builds of one size and seed hold the same weights up to
  rounding.
- The tiny model is initialised with a large std: at std 0.02 a 64-wide random model puts all its
  mass on one token, and greedy output that repeats one id tests nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memserve.checkpoint.demo_tokenizer import (
    ENDOFTEXT,
    IM_END,
    save_tokenizer,
    special_token_id,
    train_tokenizer,
)
from memserve.checkpoint.staging import check_target, staging_beside, tensor_seed
from memserve.errors import InvalidArgument

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

__all__ = ["ARCHS", "DTYPES", "SIZES", "DemoModelInfo", "write_demo_model"]

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
DTYPES = ("float32", "bfloat16", "float16")

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
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
    check_target(path, force=force, replaces="replace the checkpoint files in it")

    with staging_beside(path) as staging:
        dims = SIZES[size]
        tokenizer = train_tokenizer(dims["vocab_size"])
        vocab_size = save_tokenizer(tokenizer, staging, model_max_length=dims["max_position_embeddings"])
        config = _make_config(
            size,
            arch,
            dtype,
            vocab_size=vocab_size,
            pad_id=special_token_id(tokenizer, ENDOFTEXT),
            eos_id=special_token_id(tokenizer, IM_END),
        )
        params, shards = _write_weights(staging, config, size=size, dtype=dtype, seed=seed)
        _write_configs(staging, config)
        _move_into(staging, path.absolute())
    return DemoModelInfo(
        path=path,
        arch=arch,
        size=size,
        dtype=dtype,
        params=params,
        weights_bytes=params * _ITEMSIZE[dtype],
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


def _make_config(size: str, arch: str, dtype: str, *, vocab_size: int, pad_id: int, eos_id: int) -> PretrainedConfig:
    """A ``LlamaConfig``/``Qwen2Config``; Qwen2 ties embeddings and has q/k/v biases by design.

    Like Qwen's, BOS and pad are ``<|endoftext|>`` and EOS is ``<|im_end|>`` (the end of a chat turn).
    """
    from transformers import LlamaConfig, Qwen2Config

    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    dims = SIZES[size]
    config: PretrainedConfig = config_class(
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_key_value_heads"],
        max_position_embeddings=dims["max_position_embeddings"],
        vocab_size=vocab_size,
        initializer_range=_INIT_STD[size],
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=dtype,
        # real checkpoints name their class; transformers serve and vLLM resolve the model by it
        architectures=["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
    )
    return config


def _write_configs(path: Path, config: PretrainedConfig) -> None:
    from transformers import GenerationConfig

    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    generation.save_pretrained(path)
    config.save_pretrained(path)


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _tensor_specs(config: PretrainedConfig) -> list[_TensorSpec]:
    """Names and shapes exactly as the installed transformers builds them, at no memory cost."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [_TensorSpec(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    if config.tie_word_embeddings:
        specs = [s for s in specs if s.name != "lm_head.weight"]
    return specs


def _plan_shards(specs: list[_TensorSpec], itemsize: int, limit_bytes: int) -> list[list[_TensorSpec]]:
    """Greedy in model order, like ``save_pretrained``: a tensor larger than the limit gets its own shard."""
    shards: list[list[_TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and used + nbytes > limit_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += nbytes
    return shards


def _make_tensor(spec: _TensorSpec, *, std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Biases are zeros and norm weights ones (as transformers initialises them); the rest N(0, std)."""
    import torch

    if spec.name.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    values = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    return values if dtype == torch.float32 else values.to(dtype)


def _shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield "model.safetensors"
        return
    for i in range(1, count + 1):
        yield f"model-{i:05d}-of-{count:05d}.safetensors"


def _write_weights(path: Path, config: PretrainedConfig, *, size: str, dtype: str, seed: int) -> tuple[int, int]:
    """Write the safetensors shards (and the index when there are several); return (params, shards)."""
    import torch
    from safetensors.torch import save_file

    torch_dtype: torch.dtype = getattr(torch, dtype)
    shards = _plan_shards(_tensor_specs(config), _ITEMSIZE[dtype], _SHARD_LIMIT_BYTES[size])
    file_mode = (path / "tokenizer.json").stat().st_mode & 0o777
    weight_map: dict[str, str] = {}
    params = 0

    def make(spec: _TensorSpec) -> torch.Tensor:
        return _make_tensor(spec, std=_INIT_STD[size], seed=seed, dtype=torch_dtype)

    # normal_ runs on one core; a few threads (torch releases the GIL) fill the cores. Each tensor has
    # its own generator, so the bytes do not depend on the scheduling.
    with ThreadPoolExecutor(max_workers=max(1, min(4, torch.get_num_threads()))) as pool:
        for filename, specs in zip(_shard_names(len(shards)), shards, strict=True):
            tensors = dict(zip([s.name for s in specs], pool.map(make, specs), strict=True))
            save_file(tensors, str(path / filename), metadata={"format": "pt"})
            # safetensors writes through a private temp file (mode 0600); match the other files' mode.
            (path / filename).chmod(file_mode)
            del tensors
            for s in specs:
                weight_map[s.name] = filename
                params += s.numel
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": params * _ITEMSIZE[dtype], "total_parameters": params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return params, len(shards)


def _is_checkpoint_file(name: str) -> bool:
    return name in _CHECKPOINT_FILES or name.endswith((".safetensors", ".safetensors.index.json"))


def _move_into(staging: Path, path: Path) -> None:
    """Replace the checkpoint files of ``path`` with those in ``staging``; ``config.json`` goes last.

    A new ``path`` is the staging directory renamed (atomic); an existing one keeps its inode and mode.
    """
    if not path.exists():
        staging.rename(path)
        return
    for old in path.iterdir():
        if old.is_file() and _is_checkpoint_file(old.name):
            old.unlink()
    for new in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        shutil.move(new, path / new.name)  # a rename, or a copy when path is a mount point
