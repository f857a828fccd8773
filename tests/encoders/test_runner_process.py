"""A real encoder runner process (``python -m memserve.runner`` on an ``engine: encoder`` plan): it serves
concurrent requests in shared batches, and its measured worst-case peak stays within its plan."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from tests.serving import runner_process


def test_runner_batches_concurrent_requests_within_its_plan(tmp_path: Path, bert_embed_dir: Path) -> None:
    with runner_process(bert_embed_dir, tmp_path, name="emb", context=128, concurrency=4) as base:
        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health["engine"] == "encoder" and health["plan"]["engine"] == "encoder"
        check = health["load"]["plan_check"]
        assert check["fits"], check  # the heaviest batch the budget admits, measured, is within the plan
        assert check["prompt_tokens"] == 2048  # 16 inputs of the model's 128-token limit

        def embed(i: int) -> list[float]:
            body = {"model": "emb", "input": [f"text number {i}", "another one"]}
            response = httpx.post(f"{base}/v1/embeddings", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return list(response.json()["data"][0]["embedding"])

        with ThreadPoolExecutor(8) as pool:
            vectors = list(pool.map(embed, range(32)))
        assert len({json.dumps(v) for v in vectors}) == 32
        stats = httpx.get(f"{base}/stats", timeout=10).json()
        assert stats["requests_total"] == 32 and stats["extra"]["inputs_total"] == 64
        refused = httpx.post(f"{base}/v1/embeddings", json={"model": "emb", "input": ""}, timeout=10)
        assert refused.status_code == 400
        assert httpx.post(f"{base}/v1/embeddings", json={"model": "emb", "input": "x"}, timeout=10).status_code == 200


def test_classifier_runner_serves_its_adapter_beside_the_base(
    tmp_path: Path, electra_classify_dir: Path, spam_adapter_dir: Path
) -> None:
    adapter = spam_adapter_dir.name  # named by its folder, as fit --adapter names it
    with runner_process(
        electra_classify_dir, tmp_path, name="spam", context=128, concurrency=2, adapters=(spam_adapter_dir,)
    ) as base:
        models = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("spam", None), (adapter, "spam")]

        def classify(model: str) -> list[float]:
            body = {"model": model, "input": "win a free cruise now"}
            response = httpx.post(f"{base}/v1/classify", json=body, timeout=60)
            assert response.status_code == 200, response.text
            row = response.json()["data"][0]
            assert row["label"] in ("spam", "ham") and row["num_classes"] == 2
            return list(row["probs"])

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(classify, ["spam", adapter, f"spam:{adapter}", "spam"]))
        # batch sizes may differ between the calls, so equal within float rounding, not bit for bit
        assert np.allclose(answers[0], answers[3], atol=1e-6) and np.allclose(answers[1], answers[2], atol=1e-6)
        assert not np.allclose(answers[0], answers[1], atol=1e-3)  # the adapter changes the answer
        wrong = httpx.post(f"{base}/v1/embeddings", json={"model": "spam", "input": "x"}, timeout=10)
        assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]

        # adapters added and removed at run time, between two forwards, without a reload
        added = httpx.post(f"{base}/adapters", json={"name": "again", "source": str(spam_adapter_dir)}, timeout=60)
        assert added.status_code == 200, added.text
        assert np.allclose(classify("again"), answers[1], atol=1e-6)  # the same weights under another name
        taken = httpx.post(f"{base}/adapters", json={"name": "again", "source": str(spam_adapter_dir)}, timeout=60)
        assert taken.status_code == 400 and "taken" in taken.text
        not_adapter = httpx.post(f"{base}/adapters", json={"name": "x", "source": str(tmp_path)}, timeout=60)
        assert not_adapter.status_code == 400 and "adapter_config.json" in not_adapter.text

        def status(model: str) -> int:
            body = {"model": model, "input": "win a free cruise now"}
            return httpx.post(f"{base}/v1/classify", json=body, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:  # removed while requests use it: they end with an answer or a 404
            calls = [pool.submit(status, adapter) for _ in range(16)]
            removed = httpx.delete(f"{base}/adapters/{adapter}", timeout=60)
            statuses = [c.result() for c in calls]
        assert removed.status_code == 200, removed.text
        assert set(statuses) <= {200, 404} and status(adapter) == 404
        assert np.allclose(classify("spam"), answers[0], atol=1e-6) and np.allclose(
            classify("again"), answers[1], atol=1e-6
        )
        assert httpx.delete(f"{base}/adapters/again", timeout=60).status_code == 200  # the last: kept by PEFT, unserved
        assert np.allclose(classify("spam"), answers[0], atol=1e-6)
        listed = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]]
        assert listed == ["spam"]
        again = httpx.post(f"{base}/adapters", json={"name": "again", "source": str(spam_adapter_dir)}, timeout=60)
        assert again.status_code == 200 and np.allclose(classify("spam:again"), answers[1], atol=1e-6)
