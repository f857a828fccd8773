"""Demo encoders built once per session: a BERT embedder per pooling, an ELECTRA spam classifier and its adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from memserve.checkpoint.demo_encoder import write_demo_encoder, write_demo_encoder_adapter


@pytest.fixture(scope="session")
def encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="session")
def bert_embed_dir(encoders_dir: Path) -> Path:
    """BERT, mean pooling, normalized, Matryoshka sizes 32 and 16. Read it; do not write into it."""
    return write_demo_encoder(encoders_dir / "bert-embed", arch="bert", task="embed", matryoshka=(32, 16)).path


@pytest.fixture(scope="session")
def electra_classify_dir(encoders_dir: Path) -> Path:
    """ELECTRA classifier with labels spam, ham."""
    return write_demo_encoder(
        encoders_dir / "electra-spam", arch="electra", task="classify", labels=("spam", "ham")
    ).path


@pytest.fixture(scope="session")
def spam_adapter_dir(encoders_dir: Path, electra_classify_dir: Path) -> Path:
    """A LoRA adapter (query, value; the classifier head saved whole) for the ELECTRA classifier."""
    return write_demo_encoder_adapter(electra_classify_dir, encoders_dir / "spam-adapter", seed=1)
