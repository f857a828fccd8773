"""The tiny vision-language demo models, built once per session (nothing reaches the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memserve.checkpoint.demo_vision import write_demo_vision_model


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 LLaVA (seed 0). Read it; do not write into it."""
    return write_demo_vision_model(tmp_path_factory.mktemp("demo") / "tiny-llava").path


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 Idefics3 (seed 0): images cut into tiles, as SmolVLM v1 does. Read it; do not write into it."""
    return write_demo_vision_model(tmp_path_factory.mktemp("demo") / "tiny-idefics3", arch="idefics3").path
