"""Which checkpoints are encoders, and how they pool: read from config.json and sentence-transformers files.

Torch-free (the gateway calls it before any load). An encoder is served by its own runner
(``runner/encoder.py``) with one forward per batch and no KV cache, answering ``/v1/embeddings`` or
``/v1/classify`` — which one is the checkpoint's task:

- ``classify``: ``config.json`` names a ``*ForSequenceClassification`` architecture (BERT, ELECTRA,
  RoBERTa; a decoder's sequence-classification head too). Its labels are ``id2label`` in id order.
- ``embed``: the folder is a sentence-transformers model (``modules.json`` lists a ``Pooling`` module),
  or ``config.json`` names a bare encoder (``BertModel``, ``ElectraModel``, ...).
- anything else (a causal LM, a masked-LM head): ``None``, not an encoder.

Pooling is what the sentence-transformers config declares (``1_Pooling/config.json``: mean, CLS or last
token; a ``Normalize`` module means unit length), as sentence-transformers computes it. Without one,
vLLM's defaults: CLS for an encoder, the last token for a decoder, normalized. Max pooling and the
weighted means are refused by name rather than answered with another pooling.

``dimensions`` (OpenAI's Matryoshka truncation) is allowed only where the model says it was trained for
it, as vLLM does: ``config.json`` ``matryoshka_dimensions`` (one of those sizes) or ``is_matryoshka: true``
(any size from 1 to the full one). Elsewhere only the full size is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from memserve.errors import CheckpointError, MemserveError

__all__ = [
    "ENCODER_MODEL_TYPES",
    "EncoderFacts",
    "Pooling",
    "PoolingMode",
    "Task",
    "encoder_task",
    "local_encoder_facts",
    "read_encoder_facts",
    "read_folder_encoder_facts",
    "read_pooling",
]

Task = Literal["embed", "classify"]
PoolingMode = Literal["mean", "cls", "last"]

ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "electra",
        "roberta",
        "xlm-roberta",
        "camembert",
        "distilbert",
        "mpnet",
        "deberta",
        "deberta-v2",
        "modernbert",
        "nomic_bert",
    }
)
"""Bidirectional encoders: their own pooling default is CLS, and a bare ``*Model`` of these is an embedder."""

_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
"""RoBERTa's positions start after its padding index: 514 position embeddings hold 512 tokens."""

_ST_MODES: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: the mode, and whether the vector is scaled to unit length."""

    mode: PoolingMode
    normalize: bool
    declared: bool  # read from a sentence-transformers config, not a default

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize, "declared": self.declared}


@dataclass(frozen=True)
class EncoderFacts:
    """What the gateway and the runner need to serve one encoder, without loading it."""

    task: Task
    max_tokens: int  # tokens one input may hold, special tokens included
    dimensions: int  # the embedding's full size (the hidden size)
    pooling: Pooling | None  # embed only
    matryoshka_dimensions: tuple[int, ...] | None  # the sizes it allows; () for any size; None for none
    labels: tuple[str, ...]  # classify only, in class-id order
    multi_label: bool  # classify: independent sigmoids instead of a softmax

    def allowed_dimensions(self, dimensions: int) -> bool:
        """Whether ``dimensions`` may be asked for (the module docstring has the rule)."""
        if dimensions == self.dimensions:
            return True
        if self.matryoshka_dimensions is None:
            return False
        if not self.matryoshka_dimensions:
            return 1 <= dimensions <= self.dimensions
        return dimensions in self.matryoshka_dimensions

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "max_tokens": self.max_tokens,
            "dimensions": self.dimensions,
            "pooling": self.pooling.to_json() if self.pooling else None,
            "matryoshka_dimensions": None if self.matryoshka_dimensions is None else list(self.matryoshka_dimensions),
            "labels": list(self.labels),
            "multi_label": self.multi_label,
        }


def _architectures(config: Mapping[str, Any]) -> list[str]:
    archs = config.get("architectures") or []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def _st_modules(folder: Path) -> list[dict[str, Any]]:
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/modules.json cannot be read ({exc}); fix or remove it") from exc
    if not isinstance(modules, list):
        raise CheckpointError(f"{folder}/modules.json is not a list of modules; fix or remove it")
    return [m for m in modules if isinstance(m, dict)]


def _module(modules: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((m for m in modules if str(m.get("type", "")).endswith(f".{kind}")), None)


def encoder_task(config: Mapping[str, Any], folder: Path) -> Task | None:
    """``classify``, ``embed`` or ``None`` (not an encoder), from ``config.json``'s dict and the folder's files."""
    archs = _architectures(config)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classify"
    if _module(_st_modules(folder), "Pooling") is not None:
        return "embed"
    model_type = str(config.get("model_type", ""))
    if model_type in ENCODER_MODEL_TYPES and any(a.endswith("Model") for a in archs):
        return "embed"
    return None


def read_pooling(config: Mapping[str, Any], folder: Path) -> Pooling:
    """The pooling sentence-transformers would apply to this folder, or vLLM's default when none is declared."""
    modules = _st_modules(folder)
    pooling = _module(modules, "Pooling")
    normalize = _module(modules, "Normalize") is not None
    if pooling is None:
        default: PoolingMode = "cls" if str(config.get("model_type", "")) in ENCODER_MODEL_TYPES else "last"
        return Pooling(default, normalize=True, declared=False)
    path = folder / str(pooling.get("path") or "1_Pooling") / "config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); the Pooling module in modules.json needs it") from exc
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} is not an object of pooling_mode_* flags")
    unsupported = [key for key in _ST_UNSUPPORTED if settings.get(key)]
    modes = [mode for key, mode in _ST_MODES.items() if settings.get(key)]
    if unsupported or len(modes) != 1:
        chosen = ", ".join(unsupported + [k for k in _ST_MODES if settings.get(k)]) or "none"
        raise CheckpointError(
            f"{path} asks for pooling {chosen}; memserve serves exactly one of mean, CLS or last-token pooling "
            "(pooling_mode_mean_tokens, pooling_mode_cls_token, pooling_mode_lasttoken)"
        )
    return Pooling(modes[0], normalize=normalize, declared=True)


def _max_tokens(config: Mapping[str, Any], folder: Path) -> int:
    positions = config.get("max_position_embeddings")
    limit = int(positions) if isinstance(positions, int) else 512
    limit -= _POSITION_OFFSET.get(str(config.get("model_type", "")), 0)
    try:  # sentence-transformers truncates to its own max_seq_length, which may be below the positions
        st = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        st = None
    if isinstance(st, dict) and isinstance(st.get("max_seq_length"), int) and st["max_seq_length"] > 0:
        limit = min(limit, st["max_seq_length"])
    return limit


def _matryoshka(config: Mapping[str, Any]) -> tuple[int, ...] | None:
    sizes = config.get("matryoshka_dimensions")
    if isinstance(sizes, list) and sizes and all(isinstance(s, int) and s > 0 for s in sizes):
        return tuple(sorted(set(sizes), reverse=True))
    return () if config.get("is_matryoshka") is True else None


def _labels(config: Mapping[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label")
    count = config.get("num_labels")
    if isinstance(id2label, dict) and id2label:
        try:
            ordered = sorted(((int(k), str(v)) for k, v in id2label.items()), key=lambda kv: kv[0])
        except ValueError as exc:
            raise CheckpointError(f"config.json id2label has a key that is not a class id: {exc}") from exc
        return tuple(label for _, label in ordered)
    return tuple(f"LABEL_{i}" for i in range(count if isinstance(count, int) and count > 0 else 2))


def read_encoder_facts(config: Mapping[str, Any], folder: Path) -> EncoderFacts | None:
    """Everything ``EncoderFacts`` holds, or ``None`` when the checkpoint is not an encoder (``encoder_task``)."""
    task = encoder_task(config, folder)
    if task is None:
        return None
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if not isinstance(hidden, int):
        raise CheckpointError(f"{folder}/config.json has no hidden_size; an encoder's embedding size comes from it")
    return EncoderFacts(
        task=task,
        max_tokens=_max_tokens(config, folder),
        dimensions=hidden,
        pooling=read_pooling(config, folder) if task == "embed" else None,
        matryoshka_dimensions=_matryoshka(config) if task == "embed" else None,
        labels=_labels(config) if task == "classify" else (),
        multi_label=config.get("problem_type") == "multi_label_classification",
    )


def read_folder_encoder_facts(folder: Path) -> EncoderFacts | None:
    """``read_encoder_facts`` of ``folder/config.json``; None when it is not an encoder."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/config.json cannot be read ({exc})") from exc
    return read_encoder_facts(config, folder) if isinstance(config, dict) else None


def local_encoder_facts(source: str) -> EncoderFacts | None:
    """``read_folder_encoder_facts`` of a model given as a local folder (or in the local hub cache); None for
    anything else, a hub model not downloaded included (it is planned once it is local)."""
    from memserve.checkpoint.locate import locate

    try:
        folder = locate(source, lookup_hub=False).path
    except MemserveError:
        return None
    return read_folder_encoder_facts(folder) if folder is not None and (folder / "config.json").is_file() else None
