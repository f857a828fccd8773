"""Random-init bf16 (or fp32) checkpoints of ~150–200M parameters, one per family transformers commonly serves.

The estimate must hold beyond the demo models (llama, qwen2): Mistral (sliding window), Gemma2
(soft-capping, hence eager attention), GPT-2 (no GQA, learned positions) and Mixtral (MoE, fused at
load). Each is built from its transformers config class and ``save_pretrained`` — nothing comes from
a hub — with the demo tokenizer (16,384 tokens) copied from a demo-small checkpoint.

    python benchmarks/family_models.py --models-dir models gemma2 mixtral
    python benchmarks/family_models.py --models-dir models gpt2-fp32   # stored in float32

A ``-fp32`` name stores the same architecture in float32: on a CPU without native bf16 for oneDNN (this
project's VM), bf16 matmuls take a slow reference path (GPT-2's ``Conv1D`` bf16 ``addmm`` ran one
512-token warm-up for over 20 minutes without finishing it), so long contexts and many sequences are measured in fp32.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

VOCAB = 16384
_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
_LLAMA_DIMS: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_LLAMA_DIMS)),
    "qwen2": ("Qwen2Config", {**_LLAMA_DIMS, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**_LLAMA_DIMS, "sliding_window": 1024}),
    "gemma2": (
        "Gemma2Config",
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "sliding_window": 1024,
            "max_position_embeddings": 4096,
        },
    ),
    "gpt2": ("GPT2Config", {"n_embd": 1024, "n_layer": 12, "n_head": 16, "n_positions": 4096}),
    "mixtral": (
        "MixtralConfig",
        {
            "hidden_size": 512,
            "intermediate_size": 1024,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 4096,
        },
    ),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _tokenizer_source(models: Path) -> Path:
    from memserve.checkpoint.demo import write_demo_model

    path = models / "demo-small"
    if not (path / "config.json").exists():
        write_demo_model(path, size="small", force=True)
    return path


def is_family(name: str) -> bool:
    return name.removesuffix("-fp32") in FAMILIES


def ensure_family_model(models: Path, name: str) -> Path:
    """``models/family-<name>``, built once: random weights (seed 0) in bf16 (fp32 for ``<family>-fp32``),
    the demo tokenizer."""
    import torch
    import transformers

    path = models / f"family-{name}"
    if (path / "config.json").exists():
        return path
    started = time.perf_counter()
    family = name.removesuffix("-fp32")
    dtype = torch.float32 if name.endswith("-fp32") else torch.bfloat16
    class_name, dims = FAMILIES[family]
    config = getattr(transformers, class_name)(**_COMMON, **dims)
    config.dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 1
    staging = models / f".family-{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    source = _tokenizer_source(models)
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, staging / name)
    params = sum(p.numel() for p in model.parameters())
    del model
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    print(f"built {path}: {params / 1e6:.0f}M params in {time.perf_counter() - started:.1f}s", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument(
        "families", nargs="*", default=list(FAMILIES), help=", ".join(FAMILIES) + " (each also as <family>-fp32)"
    )
    args = parser.parse_args()
    for family in args.families:
        ensure_family_model(args.models_dir, family)


if __name__ == "__main__":
    main()
