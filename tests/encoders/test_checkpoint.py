"""Which checkpoints are encoders and how they pool: pure functions of config.json and the folder's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memserve.checkpoint.encoders import encoder_task, read_encoder_facts, read_folder_encoder_facts, read_pooling
from memserve.errors import CheckpointError


def _st_folder(folder: Path, pooling: dict[str, bool], *, normalize: bool) -> Path:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.mark.parametrize(
    ("config", "sentence_transformers", "task"),
    [
        ({"model_type": "electra", "architectures": ["ElectraForSequenceClassification"]}, False, "classify"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]}, False, "classify"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, False, "embed"),
        ({"model_type": "qwen2", "architectures": ["Qwen2Model"]}, True, "embed"),  # a decoder embedder
        ({"model_type": "qwen2", "architectures": ["Qwen2Model"]}, False, None),
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, False, None),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, False, None),
        ({}, False, None),
    ],
)
def test_encoder_task(tmp_path: Path, config: dict[str, Any], sentence_transformers: bool, task: str | None) -> None:
    if sentence_transformers:
        _st_folder(tmp_path, {"pooling_mode_lasttoken": True}, normalize=True)
    assert encoder_task(config, tmp_path) == task


@pytest.mark.parametrize(
    ("flags", "normalize", "mode"),
    [
        ({"pooling_mode_mean_tokens": True}, True, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, False, "cls"),
        ({"pooling_mode_lasttoken": True}, True, "last"),
    ],
)
def test_pooling_is_what_sentence_transformers_declares(
    tmp_path: Path, flags: dict[str, bool], normalize: bool, mode: str
) -> None:
    pooling = read_pooling({"model_type": "bert"}, _st_folder(tmp_path, flags, normalize=normalize))
    assert (pooling.mode, pooling.normalize, pooling.declared) == (mode, normalize, True)


@pytest.mark.parametrize(
    "flags",
    [{"pooling_mode_max_tokens": True}, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, {}],
)
def test_pooling_we_cannot_serve_is_refused_by_name(tmp_path: Path, flags: dict[str, bool]) -> None:
    with pytest.raises(CheckpointError, match="exactly one of mean, CLS or last-token"):
        read_pooling({"model_type": "bert"}, _st_folder(tmp_path, flags, normalize=False))


def test_pooling_without_sentence_transformers_is_vllms_default(tmp_path: Path) -> None:
    assert read_pooling({"model_type": "bert"}, tmp_path).mode == "cls"
    assert read_pooling({"model_type": "qwen2"}, tmp_path).mode == "last"
    assert read_pooling({"model_type": "bert"}, tmp_path).normalize


@pytest.mark.parametrize(
    ("config", "max_seq_length", "limit"),
    [
        ({"max_position_embeddings": 512}, None, 512),
        ({"max_position_embeddings": 514, "model_type": "roberta"}, None, 512),  # positions start after padding
        ({"max_position_embeddings": 512}, 256, 256),  # sentence-transformers truncates below the positions
    ],
)
def test_input_limit(tmp_path: Path, config: dict[str, Any], max_seq_length: int | None, limit: int) -> None:
    if max_seq_length is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    full = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8, **config}
    facts = read_encoder_facts(full, tmp_path)
    assert facts is not None and facts.max_tokens == limit


@pytest.mark.parametrize(
    ("extra", "asked", "allowed"),
    [
        ({}, 64, True),  # the full size is always allowed
        ({}, 32, False),  # not trained for truncation: refused
        ({"matryoshka_dimensions": [32, 16]}, 16, True),
        ({"matryoshka_dimensions": [32, 16]}, 20, False),
        ({"is_matryoshka": True}, 20, True),
        ({"is_matryoshka": True}, 65, False),
    ],
)
def test_matryoshka_rule(tmp_path: Path, extra: dict[str, Any], asked: int, allowed: bool) -> None:
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, **extra}
    facts = read_encoder_facts(config, tmp_path)
    assert facts is not None and facts.allowed_dimensions(asked) is allowed


def test_labels_in_class_id_order(tmp_path: Path) -> None:
    config = {
        "architectures": ["BertForSequenceClassification"],
        "hidden_size": 8,
        "id2label": {"1": "ham", "0": "spam"},
    }
    facts = read_encoder_facts(config, tmp_path)
    assert facts is not None and facts.labels == ("spam", "ham") and facts.pooling is None


def test_demo_checkpoints_are_what_they_say(bert_embed_dir: Path, electra_classify_dir: Path) -> None:
    embed = read_folder_encoder_facts(bert_embed_dir)
    classify = read_folder_encoder_facts(electra_classify_dir)
    assert embed is not None and embed.task == "embed" and embed.pooling is not None
    assert (embed.pooling.mode, embed.pooling.normalize, embed.matryoshka_dimensions) == ("mean", True, (32, 16))
    assert classify is not None and (classify.task, classify.labels) == ("classify", ("spam", "ham"))
