"""``memserve demo-model --arch llava|idefics3``: the tiny vision demos, written from the CLI, deterministic by seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from memserve.cli import main


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(("arch", "tokens"), [("llava", 16), ("idefics3", 68)])
def test_demo_model_writes_each_vision_arch_deterministically(tmp_path: Path, arch: str, tokens: int) -> None:
    runs = [CliRunner().invoke(main, ["demo-model", str(tmp_path / name), "--arch", arch]) for name in ("a", "b")]
    for run in runs:
        assert run.exit_code == 0, run.output
        assert f"{arch} tiny float32" in run.output and f"{tokens} tokens per image" in run.output
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    other = CliRunner().invoke(main, ["demo-model", str(tmp_path / "c"), "--arch", arch, "--seed", "1"])
    assert other.exit_code == 0 and digest(tmp_path / "c") != digest(tmp_path / "a")
    assert (tmp_path / "a" / "processor_config.json").is_file() and (tmp_path / "a" / "chat_template.jinja").is_file()


def test_an_unknown_arch_names_the_vision_ones(tmp_path: Path) -> None:
    run = CliRunner().invoke(main, ["demo-model", str(tmp_path / "x"), "--arch", "qwen2_vl"])
    assert run.exit_code != 0 and "llava, idefics3" in run.output
