"""A demo model as one GGUF file, so llama.cpp's tests and benchmarks never reach the hub.

``write_demo_gguf`` writes the project's demo checkpoint (``checkpoint/demo.py``: same size, arch and
seed give the same weights) and converts it with the ``gguf`` package's writer into what llama.cpp's
own ``convert_hf_to_gguf.py`` would produce for it: llama.cpp's tensor names, its hyperparameter keys, a
byte-level BPE tokenizer (``gpt2`` with the GPT-2 pre-tokenizer, which is the demo tokenizer's) with the
ChatML special tokens as control tokens, and the chat template. Two details only a converter knows:

- llama.cpp's ``llama`` architecture rotates pairs of adjacent features (original RoPE) while transformers
  rotates the two halves of each head, so the q and k projections of a llama checkpoint are permuted
  row-wise (``convert_hf_to_gguf.py: LlamaModel.permute``); ``qwen2`` uses the halves in both, unpermuted.
- norms and biases stay float32 whatever the file type (llama.cpp's converter does the same).

The file is written tensor by tensor (header first, then each tensor converted as it is written), so
peak memory is one tensor, and it appears at its path only once complete.

``experts`` > 0 writes a mixture-of-experts variant of a llama demo, shaped as llama.cpp's converter writes
Mixtral (``llama`` architecture, ``expert_count`` and ``expert_used_count``): each layer's MLP becomes that many
experts stacked in 3-D tensors (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``; expert ``e`` is the dense
MLP scaled by ``1 + e/100``) behind a seeded random router (``ffn_gate_inp``). It has no transformers twin: it
is for measuring what llama.cpp holds for an MoE model, not for comparing outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memserve.checkpoint.demo import write_demo_model
from memserve.errors import CheckpointError, InvalidArgument

if TYPE_CHECKING:
    import numpy as np

__all__ = ["GGUF_TYPES", "DemoGgufInfo", "convert_demo_adapter", "convert_demo_checkpoint", "write_demo_gguf"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_TYPE_OF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# transformers' names → llama.cpp's, per layer (``{}`` is the layer index) and model-wide
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",  # the MoE variant's (``_with_experts``)
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
}
_MODEL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass(frozen=True)
class DemoGgufInfo:
    """What ``write_demo_gguf`` wrote."""

    path: Path
    arch: str
    size: str
    gguf_type: str
    params: int
    file_bytes: int


def write_demo_gguf(
    path: Path,
    *,
    size: str = "tiny",
    arch: str = "llama",
    dtype: str | None = None,
    gguf_type: str | None = None,
    seed: int = 0,
    force: bool = False,
    split_tensors: int = 0,
    experts: int = 0,
    experts_used: int = 2,
) -> DemoGgufInfo:
    """Write the demo model of ``size``/``arch``/``seed`` as one GGUF file at ``path`` (``*.gguf``).

    ``dtype`` is the demo checkpoint's (float32 for tiny, bfloat16 otherwise); ``gguf_type`` the file's
    (f32, f16, bf16 or q8_0; by default the dtype's own, so the weights are the safetensors demo's exactly).
    ``split_tensors`` > 0 splits the model into files of at most that many tensors, named as llama.cpp's
    ``gguf-split`` names them (``STEM-00001-of-0000N.gguf`` beside ``path``); ``path`` in the answer is the first.
    ``experts`` > 0 (llama only) writes the mixture-of-experts variant, ``experts_used`` of them per token.
    """
    path = Path(path)
    if path.suffix != ".gguf":
        raise InvalidArgument(f"{path}: a GGUF demo model is one file; give a path ending in .gguf", param="path")
    if path.exists() and not force:
        raise InvalidArgument(f"{path} exists; choose a new path or pass --force (force=True)", param="path")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise InvalidArgument(
            f"unknown GGUF type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}", param="gguf_type"
        )
    target = path.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        info = write_demo_model(staging / "checkpoint", size=size, arch=arch, dtype=dtype, seed=seed)
        kind = gguf_type or _TYPE_OF_DTYPE[info.dtype]
        params = convert_demo_checkpoint(
            staging / "checkpoint",
            staging / "model.gguf",
            gguf_type=kind,
            split_tensors=split_tensors,
            experts=experts,
            experts_used=experts_used,
        )
        written = sorted(staging.glob("model*.gguf"))
        if len(written) == 1:
            os.replace(written[0], target)
            files = [target]
        else:
            files = [target.with_name(target.stem + f.name.removeprefix("model")) for f in written]
            for made, final in zip(written, files, strict=True):
                os.replace(made, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    first = path if len(files) == 1 else path.with_name(files[0].name)
    return DemoGgufInfo(first, arch, size, kind, params, sum(f.stat().st_size for f in files))


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' half-rotation layout → llama.cpp's adjacent pairs (``convert_hf_to_gguf.py``)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _gguf_name(name: str) -> str:
    if name in _MODEL_NAMES:
        return _MODEL_NAMES[name]
    prefix, _, rest = name.partition(".layers.")
    index, _, leaf = rest.partition(".")
    if prefix == "model" and index.isdigit() and leaf in _LAYER_NAMES:
        return f"blk.{int(index)}.{_LAYER_NAMES[leaf]}"
    raise CheckpointError(f"tensor {name} has no llama.cpp name; only the demo models' llama and qwen2 convert")


def _with_experts(tensors: Iterator[tuple[str, Any]], experts: int) -> Iterator[tuple[str, Any]]:
    """The dense MLP's three matrices of each layer as ``experts`` stacked copies (expert ``e`` scaled by
    ``1 + e/100``), and a router before them, random from a seed of the layer's index; the rest unchanged."""
    import numpy as np

    for name, data in tensors:
        prefix, dot, leaf = name.rpartition(".mlp.")
        if not dot or leaf not in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            yield name, data
            continue
        if leaf == "gate_proj.weight":
            layer = int(prefix.rpartition(".")[2])
            rng = np.random.default_rng(layer)
            yield f"{prefix}.mlp.router.weight", rng.standard_normal((experts, data.shape[1]), dtype=np.float32)
        scales = (1 + np.arange(experts, dtype=np.float32) / 100).reshape(experts, 1, 1)
        yield f"{prefix}.mlp.experts.{leaf.removesuffix('.weight')}", data[np.newaxis] * scales


def _tensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy array) in file order, one at a time."""
    import torch
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    for filename in files:
        with safe_open(str(folder / filename), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys() but no __iter__
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def _tokenizer(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their types (the added special tokens are control tokens) and merges, from ``tokenizer.json``."""
    from gguf import TokenType

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(specials)
    config = json.loads((folder / "config.json").read_text())
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = int(TokenType.CONTROL if text in specials else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def convert_demo_checkpoint(
    folder: Path, out: Path, *, gguf_type: str, split_tensors: int = 0, experts: int = 0, experts_used: int = 2
) -> int:
    """Convert a demo checkpoint folder (llama or qwen2) into one GGUF file (into splits of at most
    ``split_tensors`` tensors each when it is > 0, named by the gguf package's writer); returns its parameter count.
    ``experts`` > 0 (llama only): the mixture-of-experts variant (see the module's docstring)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    config = json.loads((folder / "config.json").read_text())
    arch = _ARCHS.get((config.get("architectures") or ["?"])[0])
    if arch is None:
        raise CheckpointError(f"{folder}: only the demo models' llama and qwen2 checkpoints convert to GGUF")
    if experts and (arch != "llama" or not 0 < experts_used <= experts):
        raise InvalidArgument(
            f"the mixture-of-experts demo is a llama model with 1 to {experts} experts used per token; got {arch} "
            f"with {experts_used}",
            param="experts",
        )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    matrix_type = {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "bf16": GGMLQuantizationType.BF16,
        "q8_0": GGMLQuantizationType.Q8_0,
    }[gguf_type]
    file_type = {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    rope = config.get("rope_parameters") or {}
    tokens, types, merges = _tokenizer(folder)

    def kind(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        router = name.endswith("mlp.router.weight")  # llama.cpp's converter keeps Mixtral's router unquantized too
        return matrix_type if len(shape) >= 2 and not router else GGMLQuantizationType.F32

    def convert(name: str, data: np.ndarray) -> np.ndarray:
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, kv_heads)
        return np.ascontiguousarray(quantize(data, kind(name, data.shape)))

    writer = GGUFWriter(out, arch, split_max_tensors=split_tensors)
    writer.add_name(f"memserve demo {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(experts_used)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(int(file_type))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))

    def tensors() -> Iterator[tuple[str, Any]]:
        return _with_experts(_tensors(folder), experts) if experts else _tensors(folder)

    params = 0
    for name, data in tensors():  # first pass: names, shapes and sizes only
        ggml_type = kind(name, data.shape)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        writer.add_tensor_info(
            _gguf_name(name), data.shape, np.dtype(np.float32), data.size * type_size // block, raw_dtype=ggml_type
        )
        params += data.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, data in tensors():
        writer.write_tensor_data(convert(name, data))
    writer.close()
    return params


def convert_demo_adapter(adapter: Path, base: Path, out: Path) -> int:
    """Convert a PEFT LoRA adapter of a demo checkpoint (``base``, llama or qwen2) into a GGUF LoRA file at ``out``,
    as llama.cpp's ``convert_lora_to_gguf.py`` would: ``general.type`` adapter, ``adapter.type`` lora,
    ``adapter.lora.alpha``; each module's A and B under its llama.cpp name (``blk.N.attn_q.weight.lora_a``), A as
    PEFT stores it ([rank, in]) and B ([out, rank]) with a llama q or k projection's rows permuted as its weight's
    are. llama.cpp scales by ``alpha / rank``, as PEFT does without rsLoRA. Returns the parameter count."""
    import numpy as np
    from gguf import GGUFWriter
    from safetensors.numpy import load_file

    config = json.loads((base / "config.json").read_text())
    arch = _ARCHS.get((config.get("architectures") or ["?"])[0])
    lora = json.loads((adapter / "adapter_config.json").read_text())
    if arch is None or lora.get("use_rslora") or lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise CheckpointError(
            f"{adapter}: only a plain LoRA (one rank and alpha, no rsLoRA) of a demo llama or qwen2 checkpoint converts"
        )
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    writer = GGUFWriter(out, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(lora["lora_alpha"]))
    params = 0
    for key, data in sorted(load_file(str(adapter / "adapter_model.safetensors")).items()):
        module, _, part = key.removeprefix("base_model.model.").partition(".lora_")
        side = part.split(".")[0]  # A or B
        data = data.astype(np.float32)
        leaf = module.rpartition(".")[2]
        if side == "B" and arch == "llama" and leaf in heads:
            data = _permute(data, heads[leaf])
        writer.add_tensor(f"{_gguf_name(module + '.weight')}.lora_{side.lower()}", np.ascontiguousarray(data))
        params += data.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params
