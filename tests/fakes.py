"""Test doubles for checkpoints: real-shaped configs and tensor listings of well-known models,
and header-only safetensors files (sparse, so a "14B" checkpoint costs no disk) for facts and CLI tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Tensors = dict[str, tuple[str, list[int]]]

GiB = 1024**3


def llama_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    config.update(overrides)
    return config


# shapes as published in each model's config.json
LLAMA3_8B = llama_config()
QWEN25_14B = llama_config(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    vocab_size=152064,
    max_position_embeddings=32768,
    sliding_window=131072,
    use_sliding_window=False,
    attention_bias=True,
)
QWEN2_05B = llama_config(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    attention_bias=True,
)
MISTRAL_7B = llama_config(
    architectures=["MistralForCausalLM"],
    model_type="mistral",
    vocab_size=32000,
    max_position_embeddings=32768,
    sliding_window=4096,
)
MIXTRAL_8X7B = llama_config(
    architectures=["MixtralForCausalLM"],
    model_type="mixtral",
    vocab_size=32000,
    max_position_embeddings=32768,
    num_local_experts=8,
    num_experts_per_tok=2,
)
LLAMA2_70B = llama_config(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def tensors_for(config: dict[str, Any], dtype: str = "BF16") -> Tensors:
    """The tensor listing transformers would save for a Llama-family config (incl. MoE and biases)."""
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    t: Tensors = {"model.embed_tokens.weight": (dtype, [vocab, h])}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (dtype, [heads * hd, h])
        t[p + "self_attn.k_proj.weight"] = (dtype, [kv * hd, h])
        t[p + "self_attn.v_proj.weight"] = (dtype, [kv * hd, h])
        t[p + "self_attn.o_proj.weight"] = (dtype, [h, heads * hd])
        if config.get("attention_bias"):
            t[p + "self_attn.q_proj.bias"] = (dtype, [heads * hd])
            t[p + "self_attn.k_proj.bias"] = (dtype, [kv * hd])
            t[p + "self_attn.v_proj.bias"] = (dtype, [kv * hd])
        experts = config.get("num_local_experts")
        if experts:
            t[p + "block_sparse_moe.gate.weight"] = (dtype, [experts, h])
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                t[q + "w1.weight"] = (dtype, [inter, h])
                t[q + "w2.weight"] = (dtype, [h, inter])
                t[q + "w3.weight"] = (dtype, [inter, h])
        else:
            t[p + "mlp.gate_proj.weight"] = (dtype, [inter, h])
            t[p + "mlp.up_proj.weight"] = (dtype, [inter, h])
            t[p + "mlp.down_proj.weight"] = (dtype, [h, inter])
        t[p + "input_layernorm.weight"] = (dtype, [h])
        t[p + "post_attention_layernorm.weight"] = (dtype, [h])
    t["model.norm.weight"] = (dtype, [h])
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = (dtype, [vocab, h])
    return t


_WIDTH = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I32": 4}


def write_header_only(path: Path, tensors: Tensors, *, truncate_by: int = 0) -> None:
    """A safetensors file whose data region is a hole: the header is real, the size is right."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = 1
        for dim in shape:
            n *= dim
        size = n * _WIDTH[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset - truncate_by)


def write_sparse_checkpoint(
    folder: Path, config: dict[str, Any], *, shards: int = 1, dtype: str = "BF16", tensors: Tensors | None = None
) -> Path:
    """config.json plus header-only safetensors (an index when sharded); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else tensors_for(config, dtype)
    names = list(tensors)
    if shards == 1:
        write_header_only(folder / "model.safetensors", tensors)
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        write_header_only(folder / filename, part)
        weight_map.update(dict.fromkeys(part, filename))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
