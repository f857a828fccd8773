"""Prompts: synthetic words, cut by a real (tiny, trained here) tokenizer, or read from a jsonl dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memserve.bench.prompts import DatasetPrompts, SyntheticPrompts, find_tokenizer, load_tokenizer
from memserve.errors import InvalidArgument


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with few merges, so most words are several tokens (as with real tokenizers)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog and the river"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_synthetic_prompts_are_seeded_and_distinct() -> None:
    prompts = SyntheticPrompts(prompt_tokens=32, output_tokens=8, seed=1)
    first = prompts.prompt(0, 0)
    assert first == SyntheticPrompts(prompt_tokens=32, output_tokens=8, seed=1).prompt(0, 0)
    assert first.text is not None and len(first.text.split()) == 32
    assert first.max_tokens == 8 and first.prompt_tokens is None  # no tokenizer: the server's usage counts
    texts = {prompts.prompt(step, i).text for step in range(3) for i in range(10)}
    assert len(texts) == 30  # no prefix cache hits across steps
    assert SyntheticPrompts(prompt_tokens=32, output_tokens=8, seed=2).prompt(0, 0) != first
    assert first.chat_messages() == [{"role": "user", "content": first.text}]


def test_a_tokenizer_cuts_prompts_to_length(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path / "model")
    tokenizer = load_tokenizer(folder)
    prompts = SyntheticPrompts(prompt_tokens=50, output_tokens=8, seed=0, tokenizer=tokenizer, tokenizer_path=folder)
    for i in range(5):
        prompt = prompts.prompt(0, i)
        assert prompt.text is not None
        assert prompt.prompt_tokens == len(tokenizer.encode(prompt.text))
        assert abs(prompt.prompt_tokens - 50) <= 1
        assert len(prompt.text.split()) < 50  # words are several tokens here
    assert prompts.describe()["source"] == "tokenizer"


def test_find_tokenizer(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path / "model")
    assert find_tokenizer(str(folder), None) == folder
    assert find_tokenizer("llama3:8b", None) is None
    assert find_tokenizer(str(tmp_path / "missing"), None) is None
    assert find_tokenizer("served-name", folder / "tokenizer.json") == folder / "tokenizer.json"
    assert load_tokenizer(folder / "tokenizer.json").encode("the fox")
    with pytest.raises(InvalidArgument, match="no such file"):
        load_tokenizer(tmp_path / "nowhere")


def test_a_dataset_is_replayed_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows: list[dict[str, Any]] = [
        {"prompt": "the quick fox", "max_tokens": 5},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "model"))
    dataset = DatasetPrompts(path, output_tokens=16, tokenizer=tokenizer)
    first, second, third = (dataset.prompt(3, i) for i in range(3))
    assert (first.text, first.max_tokens) == ("the quick fox", 5)
    assert first.prompt_tokens == len(tokenizer.encode("the quick fox"))
    assert second.messages is not None and second.chat_messages() == rows[1]["messages"]
    assert second.max_tokens == 16
    assert third == first
    assert dataset.has_messages
    assert dataset.describe() == {"source": "dataset", "dataset": str(path), "prompts": 2, "output_tokens": 16}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "has no prompts"),
        ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
        ('{"prompt": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"prompt": "a", "max_tokens": 0}\n', "line 1: max_tokens must be a positive integer"),
        ('{"text": "a"}\n', 'line 1 needs "prompt"'),
        ('{"messages": []}\n', 'line 1 needs "prompt"'),
    ],
)
def test_bad_datasets_say_which_line(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=says):
        DatasetPrompts(path, output_tokens=8)


def test_a_missing_dataset_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read --dataset"):
        DatasetPrompts(tmp_path / "nope.jsonl", output_tokens=8)
