"""A GGUF model served by the real llama-server under the pool, through the gateway: planned from its header,
started as an external runner, streamed token by token, answered as llama.cpp answers, held to its plan.

Skipped without llama-server on a developer's machine (failed under CI=true, where ``.ci/run`` builds it).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import httpx
import pytest

from tests.engines.test_external_pool import until
from tests.gateway.test_gateway_process import gateway, host, local, ps, settings_for

GiB = 1024**3
PROMPT = "The weather today is"
NEW_TOKENS = 12


def _streamed(origin: str, body: dict[str, object]) -> tuple[list[str], set[str]]:
    """A streamed completion's text pieces, and the ``model`` its chunks name."""
    pieces: list[str] = []
    models: set[str] = set()
    with httpx.stream("POST", f"{origin}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                pieces += [c["text"] for c in chunk.get("choices") or [] if c.get("text")]
                models.add(chunk.get("model"))
    return pieces, models


def test_a_gguf_model_is_served_by_llama_server_through_the_gateway(
    tmp_path: Path, tiny_gguf: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSERVE_LLAMA_SERVER_COMMAND", shlex.join(command))
    settings = settings_for(tmp_path, [local("g", tiny_gguf)])
    with gateway(settings, host(8 * GiB)) as (origin, _):
        body = {"model": "g", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
        whole = httpx.post(f"{origin}/v1/completions", json=body, timeout=120)
        assert whole.status_code == 200, whole.text
        text = whole.json()["choices"][0]["text"]
        assert text and whole.json()["usage"]["completion_tokens"] > 0

        pieces, models = _streamed(origin, body)
        assert len(pieces) > 1 and "".join(pieces) == text  # token by token, and the same greedy answer
        assert models == {"g"} and whole.json()["model"] == "g"

        row = next(m for m in ps(origin)["models"] if m["name"] == "g")
        assert row["state"] == "ready" and row["runner"] == "llama.cpp" and row["rung"] == "cpu"
        native = httpx.post(  # llama.cpp's own endpoint on the runner the pool started: the same answer
            f"http://{row['socket']}/completion",
            json={"prompt": PROMPT, "n_predict": NEW_TOKENS, "temperature": 0, "cache_prompt": False},
            timeout=60,
        ).json()
        assert native["content"] == text
        cpu = row["devices"]["cpu"]
        assert 0 < cpu["measured_bytes"] <= cpu["reserved_bytes"]

        def usage() -> int:  # rows are written in batches off the request path
            groups = httpx.get(f"{origin}/api/usage", params={"group_by": "model"}, timeout=30).json()
            return sum(g["requests"] for g in groups["rows"] if g["model"] == "g")

        until(lambda: usage() == 2, "a usage row for each of the two requests")

        # a prompt the gateway cannot count (it has no tokenizer) but llama-server refuses: memserve's error shape
        too_long = {**body, "prompt": " ".join(["a"] * 4 * row["context_tokens"])}
        refused = httpx.post(f"{origin}/v1/completions", json=too_long, timeout=120)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "context_length_exceeded")
        assert "tokens of context each of its sequences has" in error["message"]  # llama-server said it


def test_gguf_lora_adapters_through_the_gateway(
    tmp_path: Path, tiny_gguf: Path, tiny_model_dir: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF model with two GGUF LoRA adapters in its config: one llama-server holds the base once with both
    (``--lora``); requests on the base, on each adapter by its name and as ``base:adapter``, at once, each answer
    as llama-server answers with that adapter's scale alone (the gateway sets ``lora`` by id); the adapters are
    models with the base as parent; adding or removing one while it runs is a 409 (llama-server loads them at
    start), and the runner stays within its plan."""
    import asyncio

    from memserve.checkpoint.demo_adapter import write_demo_adapter
    from memserve.config import AdapterConfig

    monkeypatch.setenv("MEMSERVE_LLAMA_SERVER_COMMAND", shlex.join(command))
    files = {f"ad{s}": write_demo_adapter(tiny_model_dir, tmp_path / f"ad{s}.gguf", seed=s).path for s in (1, 2)}
    adapters = [AdapterConfig(name=name, source=str(path)) for name, path in files.items()]
    settings = settings_for(tmp_path, [local("g", tiny_gguf, adapters=adapters)])
    names = ["g", "ad1", "g:ad2", "ad1", "g"]
    with gateway(settings, host(8 * GiB)) as (origin, _):

        async def all_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                calls = (
                    client.post(
                        f"{origin}/v1/completions",
                        json={"model": m, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0},
                    )
                    for m in names
                )
                return list(await asyncio.gather(*calls))

        answers = asyncio.run(all_at_once())
        assert [a.status_code for a in answers] == [200] * len(names), [a.text for a in answers]
        row = next(m for m in ps(origin)["models"] if m["name"] == "g")
        assert row["runner"] == "llama.cpp" and len(ps(origin)["models"]) == 1  # one runner: the base once

        def native(scales: tuple[float, float]) -> str:
            lora = [{"id": i, "scale": s} for i, s in enumerate(scales)]
            body = {"prompt": PROMPT, "n_predict": NEW_TOKENS, "temperature": 0, "cache_prompt": False, "lora": lora}
            return str(httpx.post(f"http://{row['socket']}/completion", json=body, timeout=60).json()["content"])

        by_name = {"g": native((0.0, 0.0)), "ad1": native((1.0, 0.0)), "g:ad2": native((0.0, 1.0))}
        assert len(set(by_name.values())) == 3, "each adapter should change the answer, or the test proves nothing"
        assert [a.json()["choices"][0]["text"] for a in answers] == [by_name[m] for m in names]
        # llama-server answers its alias (the base) whatever was asked: the answer names the model as asked
        assert [a.json()["model"] for a in answers] == names
        body = {"model": "g:ad2", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
        pieces, streamed_models = _streamed(origin, body)
        assert "".join(pieces) == by_name["g:ad2"] and streamed_models == {"g:ad2"}

        models = {m["id"]: m.get("parent") for m in httpx.get(f"{origin}/v1/models").json()["data"]}
        assert (models["ad1"], models["ad2"]) == ("g", "g")
        body = {"model": "g", "name": "ad3", "source": str(files["ad1"])}
        added = httpx.post(f"{origin}/api/adapters", json=body, timeout=60)
        assert added.status_code == 409 and "loads adapters only when it starts" in added.text, added.text
        removed = httpx.delete(f"{origin}/api/adapters/ad2", timeout=60)
        assert removed.status_code == 409, removed.text
        cpu = next(m for m in ps(origin)["models"] if m["name"] == "g")["devices"]["cpu"]
        assert 0 < cpu["measured_bytes"] <= cpu["reserved_bytes"]
