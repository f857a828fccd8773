"""The runner's text layer: incremental detokenization and stop strings (``memserve.runner.text``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from memserve.runner.text import IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_detokenizer_emits_the_same_text_as_decoding_everything(tokenizer: Any) -> None:
    text = "Ünïcödé — 日本語のテキスト 🎉🎉 and ASCII, mixed."
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) + detokenizer.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces[:-1]), "some characters should span several tokens"


@pytest.mark.parametrize(
    ("stops", "feeds", "emitted", "stopped"),
    [
        (["END"], ["abc", "de"], ["abc", "de"], False),
        (["END"], ["abcE", "N", "D tail"], ["abc", "", ""], True),
        (["END"], ["abcE", "NX"], ["abc", "ENX"], False),
        (["xy", "abcd"], ["ab", "cxy"], ["", "abc"], True),
        (["aaa"], ["aa", "b"], ["", "aab"], False),
        ([""], ["abc"], ["abc"], False),
    ],
)
def test_stop_strings_cut_and_hold_back(stops: list[str], feeds: list[str], emitted: list[str], stopped: bool) -> None:
    matcher = StopStrings(stops)
    results = [matcher.feed(f) for f in feeds]
    assert [text for text, _ in results] == emitted
    assert results[-1][1] is stopped
