"""Encoders through the real gateway: the openai client's embeddings, vLLM's classify with an adapter named as a
model, metered like any request; a request on the wrong route is refused at the door, before any load; a batch
file of embeddings through OpenAI's Batch API answers as direct calls do."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import openai

from memserve.config import AdapterConfig
from tests.engines.test_external_pool import until
from tests.gateway.test_gateway_process import gateway, host, local, ps, settings_for

GiB = 1 << 30


def test_embeddings_and_classify_through_the_gateway(
    tmp_path: Path, bert_embed_dir: Path, electra_classify_dir: Path, spam_adapter_dir: Path, tiny_model_dir: Path
) -> None:
    models = [
        local("emb", bert_embed_dir),
        local("spam", electra_classify_dir, adapters=[AdapterConfig(name="filter", source=str(spam_adapter_dir))]),
        local("chat", tiny_model_dir),
    ]
    with gateway(settings_for(tmp_path, models), host(8 * GiB)) as (origin, _):
        # refused at the door: nothing is loaded for a request no runner could answer
        wrong = [
            httpx.post(
                f"{origin}/v1/chat/completions", json={"model": "emb", "messages": [{"role": "user", "content": "x"}]}
            ),
            httpx.post(f"{origin}/v1/classify", json={"model": "emb", "input": "x"}),
            httpx.post(f"{origin}/v1/embeddings", json={"model": "chat", "input": "x"}),
            httpx.post(f"{origin}/v1/embeddings", json={"model": "emb", "input": ["x"] * 10_000}),
            httpx.post(f"{origin}/v1/embeddings", json={"model": "emb", "input": ""}),
        ]
        assert [r.status_code for r in wrong] == [400] * 5, [r.text for r in wrong]
        messages = [r.json()["error"]["message"] for r in wrong]
        assert "POST /v1/embeddings" in messages[0] and "POST /v1/embeddings" in messages[1]
        assert "generates text" in messages[2] and "2048" in messages[3]
        assert ps(origin)["models"] == []

        client = openai.OpenAI(base_url=f"{origin}/v1", api_key="unused", max_retries=0)
        answer = client.embeddings.create(model="emb", input=["the cat sat", "a spam offer"])
        vectors = [d.embedding for d in answer.data]
        assert [d.index for d in answer.data] == [0, 1] and answer.usage.prompt_tokens > 0
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)  # the model's 2_Normalize
        short = client.embeddings.create(model="emb", input="the cat sat", dimensions=16)
        assert len(short.data[0].embedding) == 16

        def probs(model: str) -> list[float]:
            response = httpx.post(f"{origin}/v1/classify", json={"model": model, "input": "win a cruise"}, timeout=60)
            assert response.status_code == 200, response.text
            row = response.json()["data"][0]
            assert row["label"] in ("spam", "ham") and row["num_classes"] == 2
            return list(row["probs"])

        base, adapter, named = probs("spam"), probs("filter"), probs("spam:filter")
        assert np.allclose(adapter, named, atol=1e-6) and not np.allclose(base, adapter, atol=1e-3)
        listed = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        assert listed["filter"] == "spam" and listed["emb"] is None
        loaded = {row["name"] for row in ps(origin)["models"]}
        assert loaded == {"emb", "spam"}  # one runner for the base and its adapter; the chat model never loaded

        # an adapter added to the loaded classifier at run time: no reload, the same answers as the configured one
        pid = next(row["pid"] for row in ps(origin)["models"] if row["name"] == "spam")
        body = {"model": "spam", "name": "filter2", "source": str(spam_adapter_dir)}
        added = httpx.post(f"{origin}/api/adapters", json=body, timeout=120)
        assert added.status_code == 200, added.text
        assert next(row["pid"] for row in ps(origin)["models"] if row["name"] == "spam") == pid
        assert np.allclose(probs("filter2"), adapter, atol=1e-6)
        assert httpx.delete(f"{origin}/api/adapters/filter2", timeout=60).status_code == 200
        gone = httpx.post(f"{origin}/v1/classify", json={"model": "filter2", "input": "x"}, timeout=60)
        assert gone.status_code == 404, gone.text

        def counts(model: str) -> tuple[int, int]:
            groups = httpx.get(f"{origin}/api/usage", params={"group_by": "model"}, timeout=30).json()["rows"]
            return next(((g["requests"], g["errors"]) for g in groups if g["model"] == model), (0, 0))

        # an adapter's requests are metered under its own name; the four refused at the door are rows too
        expected = {
            "emb": (6, 4),
            "spam": (1, 0),
            "filter": (2, 0),
            "filter2": (2, 1),
        }  # the 404 after its removal is a row
        until(lambda: all(counts(m)[0] >= n for m, (n, _) in expected.items()), "a usage row for each request")
        assert {m: counts(m) for m in expected} == expected

        # a batch file of embeddings through OpenAI's Batch API: each line answered as a direct call is, metered
        lines = [
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "emb", "input": text}}
            for i, text in enumerate(["the cat sat", "a spam offer"])
        ]
        uploaded = client.files.create(
            file=("embed.jsonl", "\n".join(json.dumps(line) for line in lines).encode()), purpose="batch"
        )
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        until(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed"), "the batch to end")
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and done.request_counts is not None, done
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)
        assert done.output_file_id is not None
        output = client.files.content(done.output_file_id).text
        answers = {row["custom_id"]: row for row in map(json.loads, output.splitlines())}
        for index, vector in enumerate(vectors):
            response = answers[f"e{index}"]["response"]
            assert response["status_code"] == 200 and response["body"]["usage"]["prompt_tokens"] > 0
            assert np.allclose(response["body"]["data"][0]["embedding"], vector, atol=1e-6)
        until(lambda: counts("emb")[0] >= 8, "a usage row for each batch request")
        assert counts("emb") == (8, 4)
