"""Shared fixtures: demo checkpoints built once per test session (nothing reaches the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memserve.checkpoint.demo import write_demo_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 Llama demo model (seed 0, two shards). Read it; do not write into it."""
    return write_demo_model(tmp_path_factory.mktemp("demo") / "tiny-llama", size="tiny", arch="llama").path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 Qwen2 demo model (tied embeddings, q/k/v biases). Read it; do not write into it."""
    return write_demo_model(tmp_path_factory.mktemp("demo") / "tiny-qwen2", size="tiny", arch="qwen2").path
