"""``memserve demo-model --arch bert|electra --task embed|classify`` as a table through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memserve.cli.demo_model import demo_model


@pytest.mark.parametrize(
    ("args", "words", "files"),
    [
        (["--arch", "bert"], "bert tiny embed encoder (mean pooling, normalized)", {"modules.json", "2_Normalize"}),
        (
            ["--arch", "electra", "--task", "classify", "--labels", "spam,ham"],
            "labels spam,ham",
            {"config.json", "model.safetensors"},
        ),
        (["--arch", "bert", "--pooling", "cls", "--no-normalize"], "cls pooling", {"1_Pooling"}),
    ],
)
def test_demo_encoders(tmp_path: Path, args: list[str], words: str, files: set[str]) -> None:
    result = CliRunner().invoke(demo_model, [str(tmp_path / "m"), *args])
    assert result.exit_code == 0, result.output
    assert words in result.output
    assert files <= {p.name for p in (tmp_path / "m").iterdir()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        CliRunner().invoke(demo_model, [str(tmp_path / name), "--arch", "electra", "--task", "classify"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architectures"] == ["ElectraForSequenceClassification"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--arch", "bert", "--labels", "a,b"], "--labels applies to --task classify only"),
        (["--arch", "electra", "--task", "classify", "--labels", "spam"], "two or more distinct"),
        (["--task", "embed"], "apply to the encoders"),
        (["--arch", "bert", "--task", "rank"], "unknown task 'rank'"),
        (["--arch", "bert", "--matryoshka", "999"], "between 1 and 64"),
        (["--arch", "bert", "--dtype", "bfloat16"], "float32 safetensors only"),
        (["--arch", "t5"], "unknown arch 't5': expected one of llama, qwen2, bert, electra"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], words: str) -> None:
    result = CliRunner().invoke(demo_model, [str(tmp_path / "m"), *args])
    assert result.exit_code != 0 and words in result.output, result.output
