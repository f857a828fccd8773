"""The encoder runner's app on real tiny fp32 models: answers equal the reference computed by hand.

Embeddings equal the pooling computed here from the model's own hidden states (mean, CLS, last token) within
1e-5; classification probabilities equal the model's own forward; through a LoRA adapter they equal the PEFT
model's forward, in a batch that mixes adapter and base rows. Bad inputs are 400s and the runner serves on.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from memserve.checkpoint.demo_encoder import write_demo_encoder
from memserve.checkpoint.encoders import read_folder_encoder_facts
from memserve.checkpoint.facts import read_local_facts
from memserve.memory.encoders import encoder_plan
from memserve.memory.planner import Policy, Request
from memserve.memory.probe import probe_inventory
from memserve.runner.encoder import EncoderEngine, create_encoder_app, load_encoder
from memserve.runner.load import LoadReport

TEXTS = ["the quick brown fox", "spam spam spam, buy now", "a", "hello there, how are you today?"]


def _client(model_dir: Path, name: str, adapters: dict[str, Path] | None = None) -> Iterator[TestClient]:
    facts, encoder_facts = read_local_facts(model_dir), read_folder_encoder_facts(model_dir)
    assert encoder_facts is not None
    inventory = probe_inventory(memory="cpu=4GiB")
    result = encoder_plan(facts, encoder_facts, Request(context_tokens=128), inventory, Policy())
    assert result.plan is not None and result.plan.engine == "encoder"
    with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        encoder = load_encoder(str(model_dir), result.plan, LoadReport(), adapters=adapters)
    engine = EncoderEngine(encoder, max_batch_tokens=result.plan.max_batch_tokens, max_requests=8)
    app = create_encoder_app(engine=engine, encoder=encoder, model_name=name, health=lambda: {"state": "ready"})
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def embed_client(bert_embed_dir: Path) -> Iterator[TestClient]:
    yield from _client(bert_embed_dir, "emb")


@pytest.fixture(scope="module")
def classify_client(electra_classify_dir: Path, spam_adapter_dir: Path) -> Iterator[TestClient]:
    yield from _client(electra_classify_dir, "spam", adapters={"filter": spam_adapter_dir})


def _hidden(model_dir: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's last hidden states and mask, one forward per text (no padding at all)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    states, masks = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            states.append(model(**ids).last_hidden_state[0])
            masks.append(ids["attention_mask"][0])
    return states, masks  # type: ignore[return-value]


def _reference(model_dir: Path, texts: list[str], mode: str, normalize: bool, dimensions: int | None = None) -> Any:
    states, _ = _hidden(model_dir, texts)
    pooled = []
    for h in states:
        vector = {"mean": h.mean(dim=0), "cls": h[0], "last": h[-1]}[mode]
        vector = vector[:dimensions] if dimensions else vector
        pooled.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return torch.stack(pooled).numpy()


def _vectors(answer: dict[str, Any]) -> Any:
    return np.array([d["embedding"] for d in answer["data"]])


def test_mean_pooled_normalized_embeddings_equal_the_reference(embed_client: TestClient, bert_embed_dir: Path) -> None:
    response = embed_client.post("/v1/embeddings", json={"model": "emb", "input": TEXTS})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [d["index"] for d in answer["data"]] == [0, 1, 2, 3]
    np.testing.assert_allclose(_vectors(answer), _reference(bert_embed_dir, TEXTS, "mean", True), atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(bert_embed_dir)
    assert answer["usage"]["prompt_tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("last", True)])
def test_cls_and_last_token_pooling(tmp_path: Path, pooling: str, normalize: bool) -> None:
    model_dir = write_demo_encoder(tmp_path / pooling, arch="bert", pooling=pooling, normalize=normalize).path
    for client in _client(model_dir, "m"):
        answer = client.post("/v1/embeddings", json={"model": "m", "input": TEXTS}).json()
        np.testing.assert_allclose(_vectors(answer), _reference(model_dir, TEXTS, pooling, normalize), atol=1e-5)


def test_matryoshka_prefix_is_normalized_again(embed_client: TestClient, bert_embed_dir: Path) -> None:
    answer = embed_client.post("/v1/embeddings", json={"model": "emb", "input": TEXTS, "dimensions": 16}).json()
    assert len(answer["data"][0]["embedding"]) == 16
    np.testing.assert_allclose(_vectors(answer), _reference(bert_embed_dir, TEXTS, "mean", True, 16), atol=1e-5)


def test_base64_and_token_id_inputs(embed_client: TestClient, bert_embed_dir: Path) -> None:
    ids = AutoTokenizer.from_pretrained(bert_embed_dir)(TEXTS[0])["input_ids"]
    as_text = embed_client.post("/v1/embeddings", json={"model": "emb", "input": TEXTS[0]}).json()
    as_ids = embed_client.post(
        "/v1/embeddings", json={"model": "emb", "input": ids, "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(as_ids["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_text["data"][0]["embedding"], atol=1e-6)


def test_too_long_is_a_400_with_the_limit_unless_truncation_is_asked(
    embed_client: TestClient, bert_embed_dir: Path
) -> None:
    text = " ".join(["word"] * 300)
    refused = embed_client.post("/v1/embeddings", json={"model": "emb", "input": text})
    assert refused.status_code == 400, refused.text
    assert "limit of 128 tokens" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    cut = embed_client.post("/v1/embeddings", json={"model": "emb", "input": text, "truncate": True}).json()
    ids = AutoTokenizer.from_pretrained(bert_embed_dir)(text, truncation=True, max_length=128)["input_ids"]
    by_ids = embed_client.post("/v1/embeddings", json={"model": "emb", "input": ids}).json()
    assert cut["usage"]["prompt_tokens"] == 128
    np.testing.assert_allclose(_vectors(cut), _vectors(by_ids), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "emb", "input": ""}, 400, "input is empty"),
        ({"model": "emb", "input": ["x"] * 10_000}, 400, "more than the 2048"),
        ({"model": "emb", "input": [5000]}, 400, "token ids outside"),
        ({"model": "emb", "input": "x", "dimensions": 20}, 400, "allows 32, 16"),
        ({"model": "other", "input": "x"}, 404, "not 'other'"),
        ({"model": "emb", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_runner_serves_on(
    embed_client: TestClient, body: dict[str, Any], status: int, words: str
) -> None:
    response = embed_client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert words in response.text
    assert embed_client.post("/v1/embeddings", json={"model": "emb", "input": "still here"}).status_code == 200


def test_classification_probs_equal_the_models_own_forward(
    classify_client: TestClient, electra_classify_dir: Path
) -> None:
    answer = classify_client.post("/v1/classify", json={"model": "spam", "input": TEXTS}).json()
    tokenizer = AutoTokenizer.from_pretrained(electra_classify_dir)
    model = AutoModelForSequenceClassification.from_pretrained(electra_classify_dir).eval()
    with torch.inference_mode():
        expected = [torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1) for t in TEXTS]
    for row, probs in zip(answer["data"], expected, strict=True):
        assert row["num_classes"] == 2
        np.testing.assert_allclose(row["probs"], probs.numpy(), atol=1e-5)
        assert row["label"] == ("spam", "ham")[int(probs.argmax())]


def test_adapter_probs_equal_the_peft_models_forward_in_a_mixed_batch(
    classify_client: TestClient, electra_classify_dir: Path, spam_adapter_dir: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(electra_classify_dir)
    base = AutoModelForSequenceClassification.from_pretrained(electra_classify_dir).eval()
    with torch.inference_mode():
        plain = [torch.softmax(base(**tokenizer(t, return_tensors="pt")).logits[0], -1).numpy() for t in TEXTS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(spam_adapter_dir)).eval()
    with torch.inference_mode():
        adapted = [torch.softmax(peft_model(**tokenizer(t, return_tensors="pt")).logits[0], -1).numpy() for t in TEXTS]
    assert not np.allclose(plain, adapted, atol=1e-3)  # the adapter changes the answer

    def ask(model: str) -> list[list[float]]:
        body = classify_client.post("/v1/classify", json={"model": model, "input": TEXTS}).json()
        return [row["probs"] for row in body["data"]]

    with ThreadPoolExecutor(6) as pool:  # base and adapter requests at once: they may share forwards
        answers = list(pool.map(ask, ["spam", "filter", "spam:filter"] * 2))
    for model, probs in zip(["spam", "filter", "spam:filter"] * 2, answers, strict=True):
        np.testing.assert_allclose(probs, plain if model == "spam" else adapted, atol=1e-5)
    listed = classify_client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [("spam", None), ("filter", "spam")]


def test_bert_adapters_mix_per_row_in_one_forward(tmp_path: Path) -> None:
    """BERT's head is one Linear, so PEFT's adapter_names serves base and adapter rows in the same forward."""
    from peft import PeftModel

    from memserve.checkpoint.demo_encoder import write_demo_encoder_adapter

    base_dir = write_demo_encoder(tmp_path / "bert-spam", arch="bert", task="classify", labels=("spam", "ham")).path
    adapter_dir = write_demo_encoder_adapter(base_dir, tmp_path / "adapter", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        base = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
        with torch.inference_mode():
            plain = [torch.softmax(base(**tokenizer(t, return_tensors="pt")).logits[0], -1).numpy() for t in TEXTS]
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.inference_mode():
        adapted = [torch.softmax(peft_model(**tokenizer(t, return_tensors="pt")).logits[0], -1).numpy() for t in TEXTS]
    facts, encoder_facts = read_local_facts(base_dir), read_folder_encoder_facts(base_dir)
    assert encoder_facts is not None
    plan = encoder_plan(facts, encoder_facts, Request(context_tokens=128), probe_inventory(memory="cpu=4GiB"), Policy())
    assert plan.plan is not None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        encoder = load_encoder(str(base_dir), plan.plan, LoadReport(), adapters={"a": adapter_dir})
    assert encoder.mixed_batches
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    mixed = encoder.forward(rows, ["a", None, "a", None])  # one forward, two adapters
    expected = [adapted[0], plain[1], adapted[2], plain[3]]
    np.testing.assert_allclose(np.array(mixed), np.array(expected), atol=1e-5)
