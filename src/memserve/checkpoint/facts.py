"""What a checkpoint is and what it weighs, from ``config.json`` and the safetensors headers.

No tensor data is read: each shard contributes its 8-byte header length and JSON header (parsed by
``huggingface_hub``), which name every tensor with its dtype and shape. The same code prices a local
folder and a hub repository (whose headers huggingface_hub fetches with range requests).

Weights are grouped in *blocks* in load order (``embed``, ``layer.0`` … ``layer.N-1``, ``head``) so
the planner can split a model across devices the way accelerate's device maps do, and can re-price
the quantizable part (the 2-D weight matrices inside the layers) for int8 or 4-bit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from huggingface_hub import get_local_safetensors_metadata
from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError
from huggingface_hub.utils import SafetensorsRepoMetadata

from memserve.checkpoint.vision import VisionFacts, image_processor_config, takes_images
from memserve.errors import CheckpointError, ModelNotFound

if TYPE_CHECKING:
    from memserve.checkpoint.gguf import GgufFacts

# bytes per element of the safetensors dtypes (sub-byte types are packed and priced as stored)
DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "F6_E2M3": 0.75, "F6_E3M2": 0.75, "F4": 0.5, "U4": 0.5, "I4": 0.5, "U3": 0.375,
}  # fmt: skip
# config dtype names → safetensors dtype names
TORCH_DTYPES = {
    "float32": "F32", "float": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16",
    "float64": "F64",
}  # fmt: skip
SAFETENSORS_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
_SPLIT_EXPERT = re.compile(r"\.experts\.\d+\.")  # one tensor per expert (Mixtral's w1/w2/w3, Qwen-MoE's)
_EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
_HEAD_NAMES = ("lm_head", "embed_out", "output.weight")


@dataclass(frozen=True)
class Block:
    """A unit of placement: the embeddings, one decoder layer, or the final norm and LM head."""

    name: str
    params: int
    bytes: int
    # 2-D weight matrices of the block that bitsandbytes would quantize
    quantizable_params: int = 0
    quantizable_rows: int = 0
    # experts stored one tensor each, which transformers fuses into new tensors at load (see CheckpointFacts)
    split_expert_bytes: int = 0


_Facts = TypeVar("_Facts", "CheckpointFacts", "GgufFacts")  # the two kinds of model facts adapters go on


@dataclass(frozen=True)
class AdapterFacts:
    """A LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    path: str
    base_model: str | None
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...]
    params: int
    weights_bytes: int


@dataclass(frozen=True)
class CheckpointFacts:
    """Everything the planner needs to know about a model, without loading it."""

    source: str
    format: Literal["safetensors", "bin"]
    model_type: str
    architectures: tuple[str, ...]
    dtype: str  # the checkpoint's compute dtype as torch names it: "bfloat16", "float32", ...
    params: int
    weights_bytes: int
    params_by_dtype: dict[str, int]
    bytes_by_dtype: dict[str, int]
    blocks: tuple[Block, ...]
    shards: int
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context_tokens: int | None
    sliding_window: int | None
    sliding_window_layers: int  # how many layers use the sliding window (0 when none)
    tie_word_embeddings: bool
    experts: int | None
    experts_per_token: int | None
    quantization: dict[str, Any] | None  # the checkpoint's own quantization_config (pre-quantized)
    warnings: tuple[str, ...] = ()
    # attention that materialises its scores (Gemma2's soft-capping rules out sdpa: transformers runs eager)
    eager_attention: bool = False
    # MoE experts stored one tensor per expert: transformers fuses them into new tensors at load while the
    # mapped file pages stay resident, so these bytes are held twice
    split_expert_bytes: int = 0
    # ``tokens × intermediate`` tensors the MLP holds at once (see ``mlp_tensors``)
    mlp_tensors: int = 3
    adapters: tuple[AdapterFacts, ...] = field(default_factory=tuple)
    # a vision-language checkpoint's tower (its weights are counted with the rest): what images cost per request
    vision: VisionFacts | None = None

    @property
    def context_limit_key(self) -> str:
        """Where ``max_context_tokens`` comes from, as an error names it."""
        return "max_position_embeddings"

    @property
    def dtype_bytes(self) -> int:
        return int(DTYPE_BYTES[TORCH_DTYPES[self.dtype]])

    @property
    def quantizable_params(self) -> int:
        return sum(b.quantizable_params for b in self.blocks)

    @property
    def prequantized(self) -> bool:
        return self.quantization is not None

    def kv_bytes_per_token(self, value_bytes: int | None = None) -> int:
        """K and V for one token over every layer: ``2 × layers × kv_heads × head_dim × bytes``."""
        width = value_bytes if value_bytes is not None else self.dtype_bytes
        return 2 * self.layers * self.kv_heads * self.head_dim * width

    def kv_bytes(self, context_tokens: int, value_bytes: int | None = None) -> int:
        """K and V for one sequence of ``context_tokens``; sliding-window layers hold at most the window."""
        width = value_bytes if value_bytes is not None else self.dtype_bytes
        per_layer_token = 2 * self.kv_heads * self.head_dim * width
        full_layers = self.layers - self.sliding_window_layers
        windowed = min(context_tokens, self.sliding_window) if self.sliding_window else context_tokens
        return per_layer_token * (full_layers * context_tokens + self.sliding_window_layers * windowed)

    def summary(self) -> dict[str, Any]:
        """The public ``model`` object of ``memserve fit --json``."""
        return {
            "source": self.source,
            "format": self.format,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "dtype": self.dtype,
            "params": self.params,
            "weights_bytes": self.weights_bytes,
            "params_by_dtype": self.params_by_dtype,
            "bytes_by_dtype": self.bytes_by_dtype,
            "shards": self.shards,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_context_tokens": self.max_context_tokens,
            "sliding_window": self.sliding_window,
            "sliding_window_layers": self.sliding_window_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "experts": self.experts,
            "experts_per_token": self.experts_per_token,
            "quantization": self.quantization,
            "eager_attention": self.eager_attention,
            "split_expert_bytes": self.split_expert_bytes,
            "mlp_tensors": self.mlp_tensors,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "adapters": [a.__dict__ | {"target_modules": list(a.target_modules)} for a in self.adapters],
            "vision": dict(self.vision.__dict__) if self.vision is not None else None,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------- config


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _require_int(config: Mapping[str, Any], what: str, *keys: str, source: str) -> int:
    value = _first(config, *keys)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        found = "missing" if value is None else f"{value!r}"
        raise CheckpointError(
            f"{source}: config.json field {keys[0]} ({what}) is {found}; expected a positive integer. "
            "Is this a decoder-only language model checkpoint?"
        )
    return value


def read_config(folder: Path, *, source: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{source}: no config.json in {folder}; expected a Hugging Face model folder "
            "(config.json plus *.safetensors)"
        )
    return parse_config(path.read_bytes(), source=source)


def parse_config(raw: bytes, *, source: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: config.json is not valid JSON ({exc}); re-download or fix it") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: config.json holds a {type(config).__name__}, expected an object")
    return config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model's dims under ``text_config``."""
    text = config.get("text_config")
    if isinstance(text, dict):
        return {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    return config


def _sliding(config: Mapping[str, Any], layers: int) -> tuple[int | None, int]:
    window = config.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return None, 0
    if config.get("use_sliding_window") is False:
        return None, 0
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        count = sum(1 for t in layer_types if t == "sliding_attention")
        return (window, count) if count else (None, 0)
    max_window_layers = config.get("max_window_layers")
    if config.get("use_sliding_window") is True and isinstance(max_window_layers, int):
        # Qwen2: layers from max_window_layers on use the window
        count = max(0, layers - max_window_layers)
        return (window, count) if count else (None, 0)
    return window, layers  # Mistral-style: every layer


# -------------------------------------------------------------------------------------- tensors


def _block_of(name: str) -> str:
    match = _LAYER.search(name)
    if match:
        return f"layer.{int(match.group(1))}"
    if any(h in name for h in _HEAD_NAMES) or re.search(r"(^|\.)(norm|ln_f|final_layernorm)\.", name):
        return "head"
    return "embed"


def _quantizable(name: str, shape: list[int]) -> bool:
    """bitsandbytes replaces nn.Linear inside the layers; embeddings, head and norms stay as they are."""
    return len(shape) == 2 and name.endswith(".weight") and _LAYER.search(name) is not None


def _blocks(tensors: Mapping[str, tuple[str, list[int]]], layers: int) -> tuple[Block, ...]:
    acc: dict[str, list[int]] = {}
    for name, (dtype, shape) in tensors.items():
        params = 1
        for dim in shape:
            params *= dim
        nbytes = int(params * DTYPE_BYTES[dtype])
        entry = acc.setdefault(_block_of(name), [0, 0, 0, 0, 0])
        entry[0] += params
        entry[1] += nbytes
        if _quantizable(name, shape):
            entry[2] += params
            entry[3] += shape[0]
        if _SPLIT_EXPERT.search(name):
            entry[4] += nbytes
    order = ["embed", *(f"layer.{i}" for i in range(layers)), "head"]
    extra = sorted(set(acc) - set(order))  # more layer indices than the config says: keep them
    return tuple(Block(n, *acc[n]) for n in [*order, *extra] if n in acc)


def _tensors_from_metadata(meta: SafetensorsRepoMetadata, source: str) -> dict[str, tuple[str, list[int]]]:
    tensors: dict[str, tuple[str, list[int]]] = {}
    for file_meta in meta.files_metadata.values():
        for name, info in file_meta.tensors.items():
            if info.dtype not in DTYPE_BYTES:
                raise CheckpointError(
                    f"{source}: tensor {name} has dtype {info.dtype!r}, which memserve cannot price; "
                    f"known dtypes: {', '.join(DTYPE_BYTES)}"
                )
            tensors[name] = (info.dtype, list(info.shape))
    return tensors


def _check_not_truncated(folder: Path, meta: SafetensorsRepoMetadata, source: str) -> None:
    """A header can be intact while the data behind it is cut short (an interrupted download)."""
    for filename, file_meta in meta.files_metadata.items():
        path = folder / filename
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        end = max((info.data_offsets[1] for info in file_meta.tensors.values()), default=0)
        expected = 8 + header_len + end
        actual = path.stat().st_size
        if actual < expected:
            raise CheckpointError(
                f"{source}: {filename} is truncated: its header describes {expected} bytes but the file "
                f"has {actual}; re-download or regenerate the checkpoint"
            )


_GATED_MLP = re.compile(r"gate_proj|gate_up_proj|\.w1\.|\.w3\.")
# activations transformers writes as Python expressions, each step a new tensor (GPT-2's gelu_new:
# ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x³)))``); the others are one fused op
_COMPOSITE_ACTIVATIONS = ("gelu_new", "gelu_fast", "quick_gelu", "gelu_accurate")


def mlp_tensors(config: Mapping[str, Any], tensor_names: Iterable[str]) -> int:
    """``tokens × intermediate`` tensors alive at once in one MLP, measured as a plain forward's peak
    above its rest (fp32, 512 and 2,048 tokens): a gated MLP (Llama's gate, up and act(gate)·up) holds 3;
    GPT-2's ungated one holds 4 — its input, ``0.5·x`` kept to the end, and two temporaries of gelu_new
    (176.3 MiB measured at 2,048 tokens, exactly 4 of them over the residual stream's); an ungated MLP with
    a fused activation holds 2 (its input and output)."""
    if any(_GATED_MLP.search(name) for name in tensor_names):
        return 3
    activation = _first(config, "hidden_act", "hidden_activation", "activation_function")
    return 4 if activation in _COMPOSITE_ACTIVATIONS else 2


def facts_from(
    config: dict[str, Any],
    tensors: Mapping[str, tuple[str, list[int]]],
    *,
    source: str,
    format: Literal["safetensors", "bin"] = "safetensors",
    shards: int = 1,
    warnings: tuple[str, ...] = (),
    processor: Mapping[str, Any] | None = None,
) -> CheckpointFacts:
    """Combine a config and a tensor listing ``{name: (safetensors dtype, shape)}`` into facts; ``processor`` is the
    image processor's saved settings, for a vision-language checkpoint (``image_processor_config``)."""
    cfg = _text_config(config)
    layers = _require_int(cfg, "number of layers", "num_hidden_layers", "n_layer", "num_layers", source=source)
    hidden = _require_int(cfg, "hidden size", "hidden_size", "n_embd", "d_model", source=source)
    heads = _require_int(cfg, "attention heads", "num_attention_heads", "n_head", source=source)
    vocab = _require_int(cfg, "vocabulary size", "vocab_size", source=source)
    kv_heads = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = _first(cfg, "head_dim") or hidden // heads
    intermediate = _first(cfg, "moe_intermediate_size", "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    max_ctx = _first(cfg, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    window, window_layers = _sliding(cfg, layers)
    tied = bool(cfg.get("tie_word_embeddings", True))
    quant = cfg.get("quantization_config")

    tensors = dict(tensors)
    if tied and any("lm_head" in n for n in tensors) and any(e in n for n in tensors for e in _EMBED_NAMES):
        # stored twice but tied on load: one copy in memory
        tensors = {n: v for n, v in tensors.items() if "lm_head" not in n}
    if not tensors:
        raise CheckpointError(f"{source}: the checkpoint lists no tensors; expected model weights")

    params_by_dtype: dict[str, int] = {}
    bytes_by_dtype: dict[str, int] = {}
    for dtype, shape in tensors.values():
        n = 1
        for dim in shape:
            n *= dim
        params_by_dtype[dtype] = params_by_dtype.get(dtype, 0) + n
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + int(n * DTYPE_BYTES[dtype])

    blocks = _blocks(tensors, layers)
    declared = _first(cfg, "dtype", "torch_dtype")
    if isinstance(declared, str) and declared in TORCH_DTYPES:
        dtype = "float32" if declared == "float" else "float16" if declared == "half" else declared
    else:  # the floating dtype holding most parameters
        floats = {d: n for d, n in params_by_dtype.items() if d in SAFETENSORS_TO_TORCH}
        dtype = SAFETENSORS_TO_TORCH[max(floats, key=lambda d: floats[d])] if floats else "float16"

    return CheckpointFacts(
        source=source,
        format=format,
        model_type=str(cfg.get("model_type", "unknown")),
        architectures=tuple(cfg.get("architectures") or ()),
        dtype=dtype,
        params=sum(params_by_dtype.values()),
        weights_bytes=sum(bytes_by_dtype.values()),
        params_by_dtype=params_by_dtype,
        bytes_by_dtype=bytes_by_dtype,
        blocks=blocks,
        shards=shards,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=vocab,
        max_context_tokens=int(max_ctx) if isinstance(max_ctx, int) else None,
        sliding_window=window,
        sliding_window_layers=window_layers,
        tie_word_embeddings=tied,
        experts=_first(cfg, "num_local_experts", "num_experts", "n_routed_experts"),
        experts_per_token=_first(cfg, "num_experts_per_tok", "moe_top_k"),
        quantization=quant if isinstance(quant, dict) else None,
        warnings=warnings,
        eager_attention=_first(cfg, "attn_logit_softcapping") is not None,
        split_expert_bytes=sum(b.split_expert_bytes for b in blocks),
        mlp_tensors=mlp_tensors(cfg, tensors),
        vision=VisionFacts.from_config(config, processor),
    )


def facts_from_metadata(
    config: dict[str, Any],
    meta: SafetensorsRepoMetadata,
    *,
    source: str,
    processor: Mapping[str, Any] | None = None,
) -> CheckpointFacts:
    tensors = _tensors_from_metadata(meta, source)
    return facts_from(config, tensors, source=source, shards=len(meta.files_metadata), processor=processor)


# ------------------------------------------------------------------------------- local folders


def _bin_facts(folder: Path, config: dict[str, Any], source: str, processor: Mapping[str, Any]) -> CheckpointFacts:
    """Only pickled ``.bin`` weights: price them from file sizes, spread evenly over the layers."""
    files = sorted(folder.glob("*.bin"))
    total = sum(f.stat().st_size for f in files)
    cfg = _text_config(config)
    layers = _require_int(cfg, "number of layers", "num_hidden_layers", "n_layer", "num_layers", source=source)
    hidden = _require_int(cfg, "hidden size", "hidden_size", "n_embd", "d_model", source=source)
    vocab = _require_int(cfg, "vocabulary size", "vocab_size", source=source)
    declared = str(_first(cfg, "dtype", "torch_dtype") or "float32")
    st_dtype = TORCH_DTYPES.get(declared, "F32")
    width = int(DTYPE_BYTES[st_dtype])
    elements = total // width
    embed = min(elements // 2, vocab * hidden)
    per_layer = max(0, (elements - embed) // layers)
    # a synthetic listing in the same shape as a real one, so the rest of the code sees no difference
    tensors: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": (st_dtype, [embed])}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.weight"] = (st_dtype, [1, per_layer])
    warning = (
        "only pickled .bin weights: estimated from file sizes; loading them is slower (no memory map, "
        "a full copy in RAM while loading) and unsafe (pickle can run code) - convert to safetensors"
    )
    return facts_from(
        config, tensors, source=source, format="bin", shards=len(files), warnings=(warning,), processor=processor
    )


def read_adapter_facts(folder: Path) -> AdapterFacts:
    """Facts of a LoRA adapter folder; its weights are small and always loaded in full."""
    source = str(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{source}: no adapter_config.json; expected a PEFT LoRA adapter folder")
    config = parse_config(config_path.read_bytes(), source=source)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{source}: no adapter_model.safetensors next to adapter_config.json")
    meta = _local_metadata(weights, source)
    tensors = _tensors_from_metadata(meta, source)
    params = 0
    nbytes = 0
    for dtype, shape in tensors.values():
        n = 1
        for dim in shape:
            n *= dim
        params += n
        nbytes += int(n * DTYPE_BYTES[dtype])
    targets = config.get("target_modules") or ()
    return AdapterFacts(
        path=source,
        base_model=config.get("base_model_name_or_path"),
        rank=config.get("r"),
        alpha=config.get("lora_alpha"),
        target_modules=tuple(targets) if isinstance(targets, list) else (str(targets),),
        params=params,
        weights_bytes=nbytes,
    )


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def check_adapters_on_base(adapters: Iterable[Path], base: Path) -> None:
    """CheckpointError when a PEFT adapter folder of ``adapters`` is sure not to fit the base checkpoint in folder
    ``base`` (whose header is read once for all), read from both safetensors headers, as the runner would find
    once loaded (``runner/lora.py``): a target whose base weight has other input or output widths
    (``adapter_base_mismatch``), or targets none of which the base has. A target found under no name is left to
    the runner (checkpoint names may differ from module paths): each is looked up as ``MODULE.weight``, else as
    the base weights whose names end with its last three path components (``0.self_attn.q_proj``; a vision tower
    may have one too), and is a mismatch only when none of them has its widths."""
    adapters = list(adapters)
    if not adapters:
        return
    try:
        meta = get_local_safetensors_metadata(base)
    except Exception:  # a .bin checkpoint, an odd layout: its load will check
        return
    weights = {n: shape for n, (_, shape) in _tensors_from_metadata(meta, str(base)).items() if len(shape) == 2}
    by_tail: dict[str, list[str]] = {}
    for name in weights:
        by_tail.setdefault(".".join(name.removesuffix(".weight").split(".")[-3:]), []).append(name)
    for adapter in adapters:
        _check_adapter_widths(adapter, base, weights, by_tail)


def _check_adapter_widths(
    adapter: Path, base: Path, weights: Mapping[str, list[int]], by_tail: Mapping[str, list[str]]
) -> None:
    adapter_tensors = _tensors_from_metadata(
        _local_metadata(adapter / "adapter_model.safetensors", str(adapter)), str(adapter)
    )
    layers: dict[str, dict[str, list[int]]] = {}
    for name, (_, shape) in adapter_tensors.items():
        found = _LORA_KEY.match(name)
        if found is not None and len(shape) == 2:
            layers.setdefault(found["module"], {})[found["part"]] = shape
    if not layers:
        return
    seen = 0
    for module, parts in sorted(layers.items()):
        exact = f"{module}.weight"
        candidates = [exact] if exact in weights else by_tail.get(".".join(module.split(".")[-3:]), [])
        if not candidates or "A" not in parts or "B" not in parts:
            continue
        seen += 1
        widths = (parts["A"][1], parts["B"][0])  # (in, out)
        # a mismatch only when no candidate has these widths, either way round (GPT-2's Conv1D stores (in, out))
        if all(widths not in ((weights[c][1], weights[c][0]), tuple(weights[c])) for c in candidates):
            in_width, out_width = weights[candidates[0]][1], weights[candidates[0]][0]
            raise CheckpointError(
                f"adapter {adapter} was trained for another base: {module} takes {widths[0]} inputs and gives "
                f"{widths[1]} outputs in the adapter, but {in_width} and {out_width} in {base} ({candidates[0]}); "
                "add it to its own base",
                code="adapter_base_mismatch",
            )
    if seen == 0:
        first = min(layers)
        raise CheckpointError(
            f"adapter {adapter} targets {first} (and {len(layers) - 1} more), which the base {base} does not have; "
            "it was trained for another architecture: add it to its own base",
            code="adapter_base_mismatch",
        )


def _local_metadata(path: Path, source: str) -> SafetensorsRepoMetadata:
    try:
        return get_local_safetensors_metadata(path)
    except SafetensorsParsingError as exc:
        raise CheckpointError(
            f"{source}: a safetensors header is corrupt or truncated ({exc}); re-download or regenerate it"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: model.safetensors.index.json is not valid JSON ({exc})") from exc
    except FileNotFoundError as exc:
        raise CheckpointError(f"{source}: a shard named in the index is missing ({exc})") from exc


def read_local_facts(folder: Path, *, source: str | None = None) -> CheckpointFacts:
    """Facts of a local model folder (single-file or sharded safetensors, or ``.bin`` only)."""
    source = source or str(folder)
    if not folder.exists():
        raise ModelNotFound(f"{source}: no such file or directory; pass a model folder or a hub id")
    if not folder.is_dir():
        raise CheckpointError(f"{source}: is a file; pass the folder that holds config.json and the weights")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        adapter = read_adapter_facts(folder)
        raise CheckpointError(
            f"{source}: is a LoRA adapter for {adapter.base_model or 'an unnamed base model'}; "
            f"pass the base model and add the adapter with --adapter {source}"
        )
    config = read_config(folder, source=source)
    processor = image_processor_config(folder) if takes_images(config) else {}
    try:
        meta = get_local_safetensors_metadata(folder)
    except NotASafetensorsRepoError:
        if any(folder.glob("*.bin")):
            return _bin_facts(folder, config, source, processor)
        if any(folder.glob("*.safetensors")):
            files = sorted(folder.glob("*.safetensors"))
            if len(files) > 1:
                raise CheckpointError(
                    f"{source}: {len(files)} safetensors files but no model.safetensors.index.json; "
                    "expected one model.safetensors or an index naming every shard"
                ) from None
            meta = _local_metadata(files[0], source)
        else:
            raise CheckpointError(
                f"{source}: has config.json but no weights (*.safetensors or *.bin); the download may be incomplete"
            ) from None
    except (SafetensorsParsingError, json.JSONDecodeError, FileNotFoundError):
        meta = _local_metadata(folder, source)  # re-raises with a clear message
    _check_not_truncated(folder, meta, source)
    return facts_from_metadata(config, meta, source=source, processor=processor)


def with_adapters(facts: _Facts, adapters: tuple[AdapterFacts, ...]) -> _Facts:
    """Facts of the base model with LoRA adapters loaded on top: their weights join the embed block (memserve's
    runner puts them there; llama.cpp allocates a GGUF adapter's beside the mapped weights, priced here on the
    host, so a split over a GPU prices them there: over rather than under)."""
    if not adapters:
        return facts
    extra = sum(a.weights_bytes for a in adapters)
    blocks = list(facts.blocks)
    blocks[0] = replace(
        blocks[0], bytes=blocks[0].bytes + extra, params=blocks[0].params + sum(a.params for a in adapters)
    )
    return replace(
        facts,
        adapters=facts.adapters + adapters,
        weights_bytes=facts.weights_bytes + extra,
        params=facts.params + sum(a.params for a in adapters),
        blocks=tuple(blocks),
    )
