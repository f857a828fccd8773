"""What a GGUF model is and what it weighs, from its own header.

A GGUF file (llama.cpp's format) carries its hyperparameters as ``<arch>.*`` metadata and lists every
tensor with its ggml type and shape before the data. Only that header is read, from the mapped file, with
the ``gguf`` package's (llama.cpp's own) type table and block sizes; tensor data is never read, only its byte
counts, so a 40 GB file is priced in well under a second.

The facts are what pricing for llama.cpp needs (``engines/llamacpp.py``): the tensor bytes as stored
(llama.cpp maps them as they are, quantized or not), grouped in blocks in load order (``embed``,
``layer.0`` … ``layer.N-1``, ``head``) so a GPU rung can offload whole layers (``-ngl``), and the KV cache
per token from the layer count, KV heads and key/value widths.

A model split into several files (llama.cpp's ``gguf-split``, or the gguf package's writer with a split limit:
``NAME-00001-of-00003.gguf`` ...) is named by its first file, as llama-server takes it: the first holds the
model's metadata and ``split.count``; every split's header is read for its tensors, and a missing or foreign
split is an error naming it.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memserve.checkpoint.facts import AdapterFacts, Block
from memserve.errors import CheckpointError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufFacts:
    """Everything llama.cpp pricing needs about one ``.gguf`` file, without loading it."""

    source: str  # what the user named (a file, a folder, a hub id)
    path: str  # the .gguf file itself
    architecture: str  # general.architecture: llama, qwen2, gemma2, ...
    name: str | None  # general.name
    file_type: str  # the file's quantization as llama.cpp names it: f32, f16, q8_0, q4_k_m, ...
    params: int
    weights_bytes: int  # every tensor's data as stored
    params_by_type: dict[str, int]
    bytes_by_type: dict[str, int]
    blocks: tuple[Block, ...]
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads_by_layer: tuple[int, ...]  # some files give a count per layer (0 for a layer without attention)
    key_length: int  # width of one head's key
    value_length: int  # width of one head's value
    vocab_size: int
    max_context_tokens: int | None
    sliding_window: int | None
    experts: int | None
    experts_per_token: int | None
    tensors: int
    file_bytes: int  # every file's bytes: the splits' together
    warnings: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()  # a split model's files, the first (``path``) included; () for one file
    adapters: tuple[AdapterFacts, ...] = ()  # GGUF LoRA adapters llama-server loads beside it (``--lora``)

    @property
    def context_limit_key(self) -> str:
        """Where ``max_context_tokens`` comes from, as an error names it."""
        return "context_length"

    @property
    def format(self) -> str:
        """The checkpoint format, as ``CheckpointFacts.format`` names it."""
        return "gguf"

    @property
    def model_type(self) -> str:
        """The architecture, named where a safetensors checkpoint names its ``model_type`` (``fit``'s table)."""
        return self.architecture

    @property
    def shards(self) -> int:
        """The files the model is in: one, or its splits (``NAME-00001-of-00003.gguf`` ...)."""
        return max(1, len(self.splits))

    @property
    def kv_heads(self) -> int:
        return max(self.kv_heads_by_layer, default=0)

    @property
    def head_dim(self) -> int:
        return self.key_length

    @property
    def dtype(self) -> str:
        """The file type: what a rung's ``dtype`` shows for a GGUF model (weights are served as stored)."""
        return self.file_type

    def kv_bytes_per_token(self, value_bytes: int = 2) -> int:
        """K and V of one token over every layer, as llama.cpp sizes its cache:
        ``Σ layers (n_embd_k_gqa + n_embd_v_gqa) × bytes`` (f16 cache: 2 bytes)."""
        return sum(n * (self.key_length + self.value_length) for n in self.kv_heads_by_layer) * value_bytes

    def summary(self) -> dict[str, Any]:
        """The public ``model`` object of ``memserve fit --json`` for a GGUF source."""
        return {
            "source": self.source,
            "format": "gguf",
            "path": self.path,
            "model_type": self.architecture,
            "architectures": [self.architecture],
            "name": self.name,
            "dtype": self.file_type,
            "params": self.params,
            "weights_bytes": self.weights_bytes,
            "params_by_dtype": self.params_by_type,
            "bytes_by_dtype": self.bytes_by_type,
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
            "experts": self.experts,
            "experts_per_token": self.experts_per_token,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "tensors": self.tensors,
            "file_bytes": self.file_bytes,
            "adapters": [dict(a.__dict__, target_modules=list(a.target_modules)) for a in self.adapters],
            "warnings": list(self.warnings),
        }


def is_gguf_file(path: Path) -> bool:
    """A file that starts with the GGUF magic (the name alone can lie)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _block_of(name: str) -> str:
    if name.startswith("blk."):
        index = name.split(".", 2)[1]
        if index.isdigit():
            return f"layer.{int(index)}"
    if name.startswith(("output.", "output_norm.")):
        return "head"
    return "embed"  # token_embd, rope_freqs and other model-wide tensors load first


@dataclass(frozen=True)
class _Tensor:
    name: str
    kind: str  # the ggml type's name: F32, Q4_K, ...
    elements: int
    bytes: int
    end: int  # where its data ends in the file
    dims: tuple[int, ...] = ()  # ggml's order: the row length first


@dataclass(frozen=True)
class _Header:
    meta: dict[str, Any]
    tensors: tuple[_Tensor, ...]


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _UnknownType(Exception):
    """A tensor type the gguf package does not know."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEPT_ARRAY = 4096  # numeric arrays up to this long are kept (per-layer counts); longer ones only counted


class _Cursor:
    """Little-endian reads over the mapped file; reading past its end raises _Truncated."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def skip(self, size: int) -> None:
        if self.at + size > len(self.data):
            raise _Truncated
        self.at += size

    def string(self) -> str:
        size = self.take("<Q")
        if self.at + size > len(self.data):
            raise _Truncated
        text = bytes(self.data[self.at : self.at + size]).decode("utf-8", errors="replace")
        self.at += size
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.take("<I"), self.take("<Q")
        if item in _SCALARS and count <= _KEPT_ARRAY:
            return [self.take(_SCALARS[item]) for _ in range(count)]
        if item in _SCALARS:  # a long numeric array (token types, scores): its length is enough
            self.skip(count * struct.calcsize(_SCALARS[item]))
        elif item == _STRING:  # tokens, merges: walk the lengths only
            for _ in range(count):
                self.skip(self.take("<Q"))
        else:
            for _ in range(count):
                self.value(item)
        return _Count(count)


@dataclass(frozen=True)
class _Count:
    """A long array's length, kept instead of its items."""

    count: int


def _parse(data: mmap.mmap) -> _Header:
    """The GGUF header (v2/v3, little-endian): metadata, then each tensor's name, shape, type and offset.

    ``gguf.GGUFReader`` builds a numpy view for every vocabulary string, seconds for a large vocabulary; this
    walks the same layout and keeps only what pricing reads. Types and block sizes are the gguf package's.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cursor = _Cursor(data)
    cursor.skip(4)  # the magic, checked by the caller
    version = cursor.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (expected 2 or 3; a big-endian file reads as a huge one)")
    n_tensors, n_kv = cursor.take("<Q"), cursor.take("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        meta[key] = cursor.value(cursor.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
        raw, offset = cursor.take("<I"), cursor.take("<Q")
        try:
            kind = GGMLQuantizationType(raw)
        except ValueError:
            raise _UnknownType(f"tensor {name} has ggml type {raw}") from None
        elements = math.prod(dims)
        block, type_size = GGML_QUANT_SIZES[kind]
        infos.append((name, kind.name, elements, elements * type_size // block, offset, tuple(dims)))
    alignment = meta.get("general.alignment", 32)
    start = cursor.at + (-cursor.at % alignment)
    return _Header(
        meta,
        tuple(_Tensor(name, kind, n, size, start + offset + size, dims) for name, kind, n, size, offset, dims in infos),
    )


def _read_header(path: Path, source: str) -> _Header:
    if not is_gguf_file(path):
        raise CheckpointError(
            f"{source}: {path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file"
        )
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)
    except _UnknownType as exc:
        raise CheckpointError(
            f"{source}: {path} has a tensor of an unknown ggml type ({exc}); it was written by a newer llama.cpp "
            "than the gguf package knows: upgrade it (pip install -U gguf) or re-convert the model"
        ) from None
    except _Truncated:
        raise CheckpointError(
            f"{source}: {path} has a truncated GGUF header (it ends inside the header); re-download or re-convert it"
        ) from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise CheckpointError(
            f"{source}: {path} has a corrupt GGUF header ({exc}); re-download or re-convert it"
        ) from None


def _positive(meta: Mapping[str, Any], key: str, source: str, path: Path) -> int:
    value = meta.get(key)
    if isinstance(value, list):  # a per-layer array: the largest entry bounds every layer
        value = max(value, default=None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        found = "missing" if value is None else repr(value)
        raise CheckpointError(
            f"{source}: {path} metadata {key} is {found}; expected a positive integer. "
            "Is this a GGUF language model llama.cpp can run?"
        )
    return value


def _optional_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _file_type(meta: Mapping[str, Any], bytes_by_type: Mapping[str, int]) -> str:
    """``general.file_type`` as llama.cpp's quantize names it (``MOSTLY_Q4_K_M`` → ``q4_k_m``); without it,
    the tensor type holding most bytes."""
    from gguf import LlamaFileType

    value = meta.get("general.file_type")
    if isinstance(value, int):
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        except ValueError:
            pass
    return max(bytes_by_type, key=lambda t: bytes_by_type[t]).lower() if bytes_by_type else "unknown"


SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
"""A split's file name, as llama.cpp's ``llama_split_path`` and the gguf package's writer make it."""


def split_files(path: Path, count: int, source: str) -> tuple[Path, ...]:
    """The ``count`` files of the split model whose first file is ``path``; CheckpointError naming what is off."""
    match = SPLIT_NAME.match(path.name)
    if match is None or int(match["no"]) != 1 or int(match["count"]) != count:
        raise CheckpointError(
            f"{source}: {path} is the first of {count} splits, but its name is not NAME-00001-of-{count:05d}.gguf; "
            "keep the names gguf-split gave the files"
        )
    files = tuple(path.with_name(f"{match['stem']}-{no:05d}-of-{count:05d}.gguf") for no in range(1, count + 1))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{source}: {path} is split into {count} files and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing beside it; download every split"
        )
    return files


def _check_end(path: Path, tensors: tuple[_Tensor, ...], source: str) -> int:
    """The file's size, or CheckpointError when its header describes more bytes than it has."""
    end = max((t.end for t in tensors), default=0)
    file_bytes = path.stat().st_size
    if end > file_bytes:
        raise CheckpointError(
            f"{source}: {path} is truncated: its header describes {end} bytes but the file has {file_bytes}; "
            "re-download or re-convert it"
        )
    return file_bytes


def read_gguf_facts(path: Path, *, source: str | None = None) -> GgufFacts:
    """Facts of one ``.gguf`` model (a file, or the first of its splits); CheckpointError (one line, naming the
    file) when it cannot be priced."""
    source = source or str(path)
    header = _read_header(path, source)
    meta = {k: (v.count if isinstance(v, _Count) else v) for k, v in header.meta.items()}
    split_no, split_count = meta.get("split.no", 0), meta.get("split.count", 1)
    if isinstance(split_no, int) and split_no > 0:
        first = SPLIT_NAME.match(path.name)
        first_file = f"{first['stem']}-00001-of-{first['count']}.gguf" if first else "its first split (-00001-of-)"
        raise CheckpointError(
            f"{source}: {path} is split {split_no + 1} of {split_count} of a model; pass the first file, {first_file}"
        )
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"{source}: {path} has no general.architecture; expected a GGUF model file")

    tensors = header.tensors
    file_bytes = _check_end(path, tensors, source)
    files: tuple[Path, ...] = ()
    if isinstance(split_count, int) and split_count > 1:
        files = split_files(path, split_count, source)
        for number, other in enumerate(files[1:], start=1):
            part = _read_header(other, source)
            if part.meta.get("split.no") != number or part.meta.get("split.count") != split_count:
                raise CheckpointError(
                    f"{source}: {other} is not split {number + 1} of {split_count} of {path.name} (its split.no is "
                    f"{part.meta.get('split.no')!r}, split.count {part.meta.get('split.count')!r}); download the "
                    "model's own splits again"
                )
            file_bytes += _check_end(other, part.tensors, source)
            tensors += part.tensors
        expected = meta.get("split.tensors.count")
        if isinstance(expected, int) and expected != len(tensors):
            raise CheckpointError(
                f"{source}: {path}'s splits list {len(tensors)} tensors, not the {expected} its split.tensors.count "
                "says; download every split again"
            )

    params_by_type: dict[str, int] = {}
    bytes_by_type: dict[str, int] = {}
    acc: dict[str, list[int]] = {}
    for tensor in tensors:
        params_by_type[tensor.kind] = params_by_type.get(tensor.kind, 0) + tensor.elements
        bytes_by_type[tensor.kind] = bytes_by_type.get(tensor.kind, 0) + tensor.bytes
        entry = acc.setdefault(_block_of(tensor.name), [0, 0])
        entry[0] += tensor.elements
        entry[1] += tensor.bytes
    if not tensors:
        raise CheckpointError(f"{source}: {path} lists no tensors; expected model weights")

    layers = _positive(meta, f"{arch}.block_count", source, path)
    hidden = _positive(meta, f"{arch}.embedding_length", source, path)
    heads = _positive(meta, f"{arch}.attention.head_count", source, path)
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    kv_by_layer = tuple(int(n) for n in kv) if isinstance(kv, list) else (int(kv),) * layers
    if len(kv_by_layer) != layers or any(n < 0 for n in kv_by_layer):
        raise CheckpointError(
            f"{source}: {path} metadata {arch}.attention.head_count_kv is {kv!r}; expected one count or one per "
            f"layer ({layers}); re-convert the model"
        )
    key_length = _optional_int(meta, f"{arch}.attention.key_length") or hidden // heads
    value_length = _optional_int(meta, f"{arch}.attention.value_length") or key_length
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _optional_int(meta, f"{arch}.vocab_size") or (tokens if isinstance(tokens, int) else 0)
    if not vocab:
        raise CheckpointError(f"{source}: {path} has no vocabulary (tokenizer.ggml.tokens); re-convert the model")
    intermediate = meta.get(f"{arch}.feed_forward_length")
    if isinstance(intermediate, list):
        intermediate = max(intermediate, default=0)

    order = ["embed", *(f"layer.{i}" for i in range(layers)), "head"]
    extra = sorted(set(acc) - set(order))
    blocks = tuple(Block(n, acc[n][0], acc[n][1]) for n in [*order, *extra] if n in acc)
    name = meta.get("general.name")
    return GgufFacts(
        source=source,
        path=str(path),
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=_file_type(meta, bytes_by_type),
        params=sum(params_by_type.values()),
        weights_bytes=sum(bytes_by_type.values()),
        params_by_type=params_by_type,
        bytes_by_type=bytes_by_type,
        blocks=blocks,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=int(intermediate) if isinstance(intermediate, int) else 4 * hidden,
        heads=heads,
        kv_heads_by_layer=kv_by_layer,
        key_length=key_length,
        value_length=value_length,
        vocab_size=int(vocab),
        max_context_tokens=_optional_int(meta, f"{arch}.context_length"),
        sliding_window=_optional_int(meta, f"{arch}.attention.sliding_window"),
        experts=_optional_int(meta, f"{arch}.expert_count"),
        experts_per_token=_optional_int(meta, f"{arch}.expert_used_count"),
        tensors=len(tensors),
        file_bytes=file_bytes,
        splits=tuple(str(f) for f in files),
    )


# ------------------------------------------------------------------------------------------------ LoRA adapters

LORA_A, LORA_B = ".lora_a", ".lora_b"


def is_gguf_adapter(path: Path) -> bool:
    """Whether ``path`` is a ``.gguf`` file: what a GGUF model's adapter is (a PEFT adapter is a folder)."""
    return path.suffix == ".gguf" and path.is_file()


def read_gguf_adapters(paths: tuple[Path, ...], base: GgufFacts) -> tuple[AdapterFacts, ...]:
    """``read_gguf_adapter`` for each of ``paths`` on ``base``, whose header is read once for all of them."""
    if not paths:
        return ()
    shapes = _tensor_dims(base)
    return tuple(read_gguf_adapter(p, base, shapes) for p in paths)


def _tensor_dims(base: GgufFacts) -> dict[str, tuple[int, ...]]:
    """Each tensor's dims in ``base``'s header (every split's), by name."""
    files = [Path(f) for f in base.splits] or [Path(base.path)]
    return {t.name: t.dims for f in files for t in _read_header(f, base.source).tensors}


def read_gguf_adapter(
    path: Path, base: GgufFacts | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> AdapterFacts:
    """Facts of a GGUF LoRA adapter (``general.type`` adapter, ``adapter.type`` lora: what llama.cpp's
    ``convert_lora_to_gguf.py`` writes), checked against ``base`` as llama.cpp checks it when it loads one
    (``llama-adapter.cpp``): the same architecture, and for each A/B pair a base tensor of that name whose row
    length is A's and whose rows are B's (``shapes``: the base's tensors, read from its header when not given).
    Every mismatch is a CheckpointError naming both files."""
    source = str(path)
    header = _read_header(path, source)
    meta = header.meta
    kind, lora = meta.get("general.type"), meta.get("adapter.type")
    if kind != "adapter" or lora != "lora":
        raise CheckpointError(
            f"{source} is not a GGUF LoRA adapter (general.type {kind!r}, adapter.type {lora!r}); a GGUF model takes "
            "LoRA adapters converted with llama.cpp's convert_lora_to_gguf.py"
        )
    pairs: dict[str, dict[str, _Tensor]] = {}
    for tensor in header.tensors:
        suffix = LORA_A if tensor.name.endswith(LORA_A) else LORA_B if tensor.name.endswith(LORA_B) else None
        if suffix is None:
            raise CheckpointError(f"{source}: tensor {tensor.name} is neither a LoRA A nor B; re-convert the adapter")
        pairs.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor
    broken = sorted(
        name for name, pair in pairs.items() if len(pair) != 2 or any(len(t.dims) != 2 for t in pair.values())
    )
    if not pairs or broken:
        raise CheckpointError(f"{source}: {broken[0] if broken else 'no tensor'} lacks its A/B pair; re-convert it")
    uneven = sorted(n for n, pair in pairs.items() if pair[LORA_A].dims[1] != pair[LORA_B].dims[0])
    if uneven:
        raise CheckpointError(f"{source}: {uneven[0]} has A and B of different ranks; re-convert the adapter")
    ranks = {pair[LORA_A].dims[1] for pair in pairs.values()}
    alpha = meta.get("adapter.lora.alpha")
    if base is not None:
        _check_adapter_base(source, meta.get("general.architecture"), pairs, base, shapes)
    return AdapterFacts(
        path=source,
        base_model=next((meta[k] for k in ("general.base_model.0.name", "general.basename") if k in meta), None),
        rank=max(ranks),
        alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
        target_modules=tuple(sorted({name.split(".")[-2] for name in pairs})),
        params=sum(t.elements for pair in pairs.values() for t in pair.values()),
        weights_bytes=sum(t.bytes for pair in pairs.values() for t in pair.values()),
    )


def _check_adapter_base(
    source: str,
    arch: Any,
    pairs: Mapping[str, Mapping[str, _Tensor]],
    base: GgufFacts,
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> None:
    if arch != base.architecture:
        raise CheckpointError(
            f"adapter {source} is for a {arch} model, and {base.path} is a {base.architecture} model; load it on "
            "its own base"
        )
    if shapes is None:
        shapes = _tensor_dims(base)
    for name, pair in sorted(pairs.items()):
        dims = shapes.get(name)
        a, b = pair[LORA_A].dims, pair[LORA_B].dims
        if dims is None:
            raise CheckpointError(
                f"adapter {source} adapts {name}, which {base.path} does not have: it was made for another "
                "architecture; load it on its own base"
            )
        if (a[0], b[1]) != (dims[0], dims[1]):
            raise CheckpointError(
                f"adapter {source} was made for another base: {name} takes {a[0]} inputs and gives {b[1]} outputs "
                f"in the adapter, but {dims[0]} and {dims[1]} in {base.path}; load it on its own base"
            )
