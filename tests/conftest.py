"""Shared fixtures: demo checkpoints built once per test session (nothing reaches the network)."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch is imported, here or in a runner a test starts
    # `make test` runs the suite in two workers (`pytest -n 2`) on a 2-core machine: each worker's torch, and every
    # runner it starts, takes one thread, or the two would oversubscribe the cores and slow each other ×3–×5
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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
