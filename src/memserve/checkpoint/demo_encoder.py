"""Deterministic demo encoders (BERT, ELECTRA) for embeddings and classification, written offline.

``write_demo_encoder`` writes what a hub encoder holds: ``config.json``, ``model.safetensors`` and a
tokenizer, and for an embedding model the sentence-transformers files that declare its pooling
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``, and ``2_Normalize`` when the
vectors are unit length). The tokenizer is the project's demo BPE (``demo_tokenizer.py``) with ``[CLS]``
and ``[SEP]`` added around every text, as a BERT tokenizer adds them, so CLS pooling reads a real
classification token.

Like ``demo.py``, tensor names and shapes come from the installed transformers on the ``meta`` device,
and each tensor is drawn from a generator seeded by ``(seed, name)``: the same arguments give the same
bytes. LayerNorm weights are ones and biases zeros, as transformers initialises them.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memserve.checkpoint.demo_tokenizer import ENDOFTEXT, special_token_id, train_tokenizer
from memserve.checkpoint.staging import check_target, replace_with, staging_beside, tensor_seed
from memserve.errors import InvalidArgument

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "CLS",
    "ENCODER_ARCHS",
    "ENCODER_SIZES",
    "POOLINGS",
    "SEP",
    "TASKS",
    "DemoEncoderInfo",
    "write_demo_encoder",
    "write_demo_encoder_adapter",
]

ENCODER_ARCHS = ("bert", "electra")
TASKS = ("embed", "classify")
POOLINGS = ("mean", "cls", "last")
CLS, SEP = "[CLS]", "[SEP]"
DEFAULT_LABELS = ("negative", "positive")

ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "embedding_size": 32,  # ELECTRA only: its embeddings are projected up to the hidden size
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1024,
        "max_position_embeddings": 128,
    },
    "small": {  # about MiniLM-L12's shape (33M parameters)
        "hidden_size": 384,
        "embedding_size": 128,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 16384,
        "max_position_embeddings": 512,
    },
}
_INIT_STD = {"tiny": 0.2, "small": 0.02}


@dataclass(frozen=True)
class DemoEncoderInfo:
    """What ``write_demo_encoder`` wrote."""

    path: Path
    arch: str
    task: str
    size: str
    params: int
    weights_bytes: int
    labels: tuple[str, ...]
    pooling: str | None
    normalize: bool
    seconds: float


def write_demo_encoder(
    path: Path,
    *,
    arch: str = "bert",
    task: str = "embed",
    size: str = "tiny",
    labels: Sequence[str] | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    matryoshka: Sequence[int] = (),
    seed: int = 0,
    force: bool = False,
) -> DemoEncoderInfo:
    """Write a random fp32 ``arch`` encoder for ``task`` into ``path`` (built beside it, moved in whole).

    ``labels`` (classify) name the classes in id order; ``pooling``, ``normalize`` and ``matryoshka`` (the
    sizes written as ``matryoshka_dimensions``) are what an embedding model declares. A non-empty ``path``
    is refused unless ``force``: then it is replaced.
    """
    started = time.perf_counter()
    labels = _check_args(arch, task, size, labels, pooling, matryoshka, seed)
    path = Path(path)
    check_target(path, force=force)
    with staging_beside(path) as staging:
        dims = ENCODER_SIZES[size]
        vocab_size, pad_id = _write_tokenizer(staging, dims)
        config = _make_config(arch, task, size, vocab_size=vocab_size, pad_id=pad_id, labels=labels)
        if matryoshka:
            config.matryoshka_dimensions = sorted(set(matryoshka), reverse=True)
        params = _write_weights(staging, config, task=task, std=_INIT_STD[size], seed=seed)
        if task == "embed":
            _write_sentence_transformers(staging, dims, pooling=pooling, normalize=normalize)
        config.save_pretrained(staging)
        replace_with(staging, path)
    return DemoEncoderInfo(
        path=path,
        arch=arch,
        task=task,
        size=size,
        params=params,
        weights_bytes=params * 4,
        labels=labels if task == "classify" else (),
        pooling=pooling if task == "embed" else None,
        normalize=normalize and task == "embed",
        seconds=time.perf_counter() - started,
    )


def _check_args(
    arch: str,
    task: str,
    size: str,
    labels: Sequence[str] | None,
    pooling: str,
    matryoshka: Sequence[int],
    seed: int,
) -> tuple[str, ...]:
    if arch not in ENCODER_ARCHS:
        raise InvalidArgument(
            f"unknown encoder arch {arch!r}: expected one of {', '.join(ENCODER_ARCHS)}", param="arch"
        )
    if task not in TASKS:
        raise InvalidArgument(f"unknown task {task!r}: expected one of {', '.join(TASKS)}", param="task")
    if size not in ENCODER_SIZES:
        raise InvalidArgument(
            f"unknown encoder size {size!r}: expected one of {', '.join(ENCODER_SIZES)}", param="size"
        )
    if pooling not in POOLINGS:
        raise InvalidArgument(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}", param="pooling")
    if labels is not None and task != "classify":
        raise InvalidArgument("--labels applies to --task classify only", param="labels")
    chosen = tuple(label.strip() for label in (labels or DEFAULT_LABELS))
    if len(chosen) < 2 or any(not label for label in chosen) or len(set(chosen)) != len(chosen):
        raise InvalidArgument(
            f"labels must be two or more distinct non-empty names, like spam,ham; got {','.join(chosen)!r}",
            param="labels",
        )
    hidden = ENCODER_SIZES[size]["hidden_size"]
    if matryoshka and (task != "embed" or any(not 1 <= d <= hidden for d in matryoshka)):
        raise InvalidArgument(
            f"matryoshka sizes apply to --task embed and must be between 1 and {hidden}, got {list(matryoshka)}",
            param="matryoshka",
        )
    if not 0 <= seed < 2**32:
        raise InvalidArgument(f"seed must be between 0 and {2**32 - 1}, got {seed}", param="seed")
    return chosen


def _write_tokenizer(path: Path, dims: dict[str, int]) -> tuple[int, int]:
    """The demo BPE with ``[CLS] text [SEP]`` around every text; returns (vocabulary size, pad id)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_tokenizer(dims["vocab_size"])
    tokenizer.add_special_tokens([CLS, SEP])
    cls_id, sep_id = special_token_id(tokenizer, CLS), special_token_id(tokenizer, SEP)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{CLS} $A {SEP}",
                pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
                special_tokens=[(CLS, cls_id), (SEP, sep_id)],
            ),
        ]
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        cls_token=CLS,
        sep_token=SEP,
        pad_token=ENDOFTEXT,
        model_max_length=dims["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(path)
    return len(hf_tokenizer), special_token_id(tokenizer, ENDOFTEXT)


def _make_config(
    arch: str, task: str, size: str, *, vocab_size: int, pad_id: int, labels: tuple[str, ...]
) -> PretrainedConfig:
    from transformers import BertConfig, ElectraConfig

    dims = ENCODER_SIZES[size]
    common: dict[str, Any] = {
        "hidden_size": dims["hidden_size"],
        "intermediate_size": dims["intermediate_size"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "num_attention_heads": dims["num_attention_heads"],
        "max_position_embeddings": dims["max_position_embeddings"],
        "vocab_size": vocab_size,
        "pad_token_id": pad_id,
        "initializer_range": _INIT_STD[size],
        "dtype": "float32",
    }
    if task == "classify":
        common["id2label"] = dict(enumerate(labels))
        common["label2id"] = {label: i for i, label in enumerate(labels)}
        common["problem_type"] = "single_label_classification"
    if arch == "bert":
        suffix = "ForSequenceClassification" if task == "classify" else "Model"
        return BertConfig(**common, architectures=[f"Bert{suffix}"])
    suffix = "ForSequenceClassification" if task == "classify" else "Model"
    return ElectraConfig(**common, embedding_size=dims["embedding_size"], architectures=[f"Electra{suffix}"])


def _write_weights(path: Path, config: PretrainedConfig, *, task: str, std: float, seed: int) -> int:
    """One ``model.safetensors`` with every tensor the installed transformers builds; returns the parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    model_class = AutoModelForSequenceClassification if task == "classify" else AutoModel
    with torch.device("meta"):
        model = model_class.from_config(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        if "position_ids" in name or "token_type_ids" in name:
            continue  # buffers the model builds itself
        if name.endswith(".bias"):
            tensors[name] = torch.zeros(meta.shape)
        elif "LayerNorm" in name or "layer_norm" in name:
            tensors[name] = torch.ones(meta.shape)
        else:
            generator = torch.Generator().manual_seed(tensor_seed(seed, name))
            tensors[name] = torch.empty(meta.shape).normal_(0.0, std, generator=generator)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "model.safetensors").chmod((path / "tokenizer.json").stat().st_mode & 0o777)
    return sum(t.numel() for t in tensors.values())


def _write_sentence_transformers(path: Path, dims: dict[str, int], *, pooling: str, normalize: bool) -> None:
    """The files sentence-transformers reads to pool and normalize, as ``SentenceTransformer.save`` writes them."""
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (path / "1_Pooling").mkdir()
    settings = {
        "word_embedding_dimension": dims["hidden_size"],
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last",
        "include_prompt": True,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    st_config = {"max_seq_length": dims["max_position_embeddings"], "do_lower_case": False}
    (path / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2) + "\n", encoding="utf-8")


def write_demo_encoder_adapter(base: Path, path: Path, *, rank: int = 4, seed: int = 0) -> Path:
    """A random LoRA adapter for the demo classifier at ``base``, as a fine-tuned spam filter is saved with PEFT:
    LoRA on the attention's query and value, the classifier head trained whole (``modules_to_save``). Both are
    drawn from ``seed`` (PEFT's default init leaves LoRA a no-op and the head a copy), so the adapter changes the
    answer. Needs PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5 a deprecated question; not ours to answer
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    peft_model.save_pretrained(str(path))
    return path
