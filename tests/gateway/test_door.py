"""Bad input is stopped at the gateway's door: before the pool leases, loads or evicts anything.

A real gateway (uvicorn in a thread) with tiny demo models that are never loaded by the bad requests:
each one gets a 4xx in the OpenAI shape at once, and the pool's events show no load. Then the other
promises of the door: browser origins, the fit route's limits, and the OpenAPI document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.wire.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    ModelCard,
    ModelList,
    TextCompletion,
    TextCompletionChunk,
)
from tests.gateway.test_gateway_process import CHAT, GiB, gateway, host, local, ps, settings_for

JSON = {"content-type": "application/json"}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {**CHAT, "model": "demo", **extra}


BAD: list[tuple[str, dict[str, str], bytes, int, str | None, str]] = [
    # (name, headers, body, status, param, words in the message)
    ("temperature hot", JSON, json.dumps(chat_body(temperature="hot")).encode(), 400, "temperature", "number"),
    ("temperature NaN", JSON, json.dumps(chat_body(temperature=float("nan"))).encode(), 400, "temperature", "finite"),
    ("user 5", JSON, json.dumps(chat_body(user=5)).encode(), 400, "user", "string"),
    ("model 5", JSON, json.dumps(chat_body(model=5)).encode(), 400, "model", "'model' is 5; send a string"),
    ("max_tokens -5", JSON, json.dumps(chat_body(max_tokens=-5)).encode(), 400, "max_tokens", "greater than"),
    ("stream 'true'", JSON, json.dumps(chat_body(stream="true")).encode(), 400, "stream", "boolean"),
    ("stream 1", JSON, json.dumps(chat_body(stream=1)).encode(), 400, "stream", "boolean"),
    (
        "max_tokens past the context",
        JSON,
        json.dumps(chat_body(max_tokens=100_000)).encode(),
        400,
        "max_tokens",
        "context is 256 tokens",
    ),
    (
        "1 MiB prompt",
        JSON,
        json.dumps(chat_body(messages=[{"role": "user", "content": "word " * 210_000}])).encode(),
        400,
        "messages",
        "bytes",
    ),
    (
        "token ids past the context",
        JSON,
        json.dumps({"model": "demo", "prompt": [5] * 300}).encode(),
        400,
        "prompt",
        "300 tokens",
    ),
    (  # 600 bytes prove at least 28 tokens; counted with the tokenizer.json, at least 297 (a model with no runner)
        "a prompt past the context in tokens, not in bytes",
        JSON,
        json.dumps(chat_body(messages=[{"role": "user", "content": "a " * 300}])).encode(),
        400,
        "messages",
        "at least 297 tokens (counted with the model's tokenizer)",
    ),
    (
        "a text prompt past the context in tokens",
        JSON,
        json.dumps({"model": "demo", "prompt": "a " * 300}).encode(),
        400,
        "prompt",
        "counted with the model's tokenizer",
    ),
    (
        "max_tokens past the context after the prompt's counted tokens",
        JSON,
        json.dumps(chat_body(messages=[{"role": "user", "content": "a " * 200}], max_tokens=100)).encode(),
        400,
        "max_tokens",
        "at least 197 in the prompt, 100 for the completion",
    ),
    ("empty messages", JSON, json.dumps(chat_body(messages=[])).encode(), 400, "messages", "at least 1"),
    ("n=2", JSON, json.dumps(chat_body(n=2)).encode(), 400, "n", "unsupported"),
    ("invalid JSON", JSON, b'{"model": "demo", "messages": [', 400, None, "not valid JSON"),
    ("a list, not an object", JSON, b"[1, 2]", 400, None, "JSON object"),
    (
        "form content type",
        {"content-type": "application/x-www-form-urlencoded"},
        json.dumps(chat_body()).encode(),
        415,
        None,
        "application/json",
    ),
    ("no content type", {}, json.dumps(chat_body()).encode(), 415, None, "Content-Type"),
    ("5 MB body", JSON, b'{"model": "demo", "x": "' + b"y" * 5_000_000 + b'"}', 413, None, "max_body_bytes"),
    ("../ in the name", JSON, json.dumps(chat_body(model="../../etc/passwd")).encode(), 404, "model", "not served"),
    ("newline in the name", JSON, json.dumps(chat_body(model="demo\nx")).encode(), 404, "model", "not served"),
    ("bad keep_alive", JSON, json.dumps(chat_body(keep_alive="soon")).encode(), 400, None, "keep_alive"),
]


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    tmp = tmp_path_factory.mktemp("door")
    settings = settings_for(
        tmp,
        [local("demo", tiny_model_dir), local("other", tiny_model_dir)],
        max_body_bytes=4 * 1024 * 1024,
        cors_origins=["http://allowed.example"],
    )
    with gateway(settings, host(4 * GiB)) as (origin, pool):
        yield origin, pool


@pytest.mark.parametrize(("name", "headers", "body", "status", "param", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_answered_at_the_door_without_loading(
    door: Any, name: str, headers: dict[str, str], body: bytes, status: int, param: str | None, words: str
) -> None:
    origin, pool = door
    path = "/v1/completions" if b'"prompt"' in body[:200] else "/v1/chat/completions"
    response = httpx.post(f"{origin}{path}", content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json()).error
    assert error.param == param and words in error.message, error
    assert [e for e in pool.events if e["event"] in ("load", "evict")] == []
    assert ps(origin)["models"] == []


def test_load_options_are_checked_before_anything_is_stored(door: Any) -> None:
    origin, pool = door
    for body, param in (
        ({"model": "demo", "concurrency": -3}, "concurrency"),
        ({"model": "demo", "context": 0}, "context"),
        ({"model": "demo", "concurrency": "4"}, "concurrency"),
    ):
        response = httpx.post(f"{origin}/api/load", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    form = httpx.post(f"{origin}/api/load", content=b'{"model": "demo"}', timeout=30)
    assert form.status_code == 415
    assert [e for e in pool.events if e["event"] == "load"] == []


def test_browser_pages_from_other_origins_are_refused(door: Any) -> None:
    origin, pool = door
    for path in ("/api/ps", "/health"):
        foreign = httpx.get(f"{origin}{path}", headers={"origin": "http://evil.example"}, timeout=10)
        assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "permission_error"
        assert "cors_origins" in foreign.json()["error"]["message"]
    posted = httpx.post(
        f"{origin}/api/load", json={"model": "demo"}, headers={"origin": "http://evil.example"}, timeout=10
    )
    assert posted.status_code == 403 and [e for e in pool.events if e["event"] == "load"] == []
    same = httpx.get(f"{origin}/health", headers={"origin": origin}, timeout=10)
    allowed = httpx.get(f"{origin}/health", headers={"origin": "http://allowed.example"}, timeout=10)
    assert same.status_code == 200 and allowed.status_code == 200


def test_fit_answers_only_about_models_the_server_may_serve(
    door: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    origin, _ = door
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a hub-shaped name that exists on the server's disk
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    answers = {}
    for name in ("/etc", "../../etc/passwd", "org/name", "/tmp", "nothing-here"):
        response = httpx.get(f"{origin}/api/fit", params={"model": name}, timeout=10)
        assert response.status_code == 404, response.text
        answers[name] = response.json()["error"]["message"].replace(repr(name), "NAME")
    assert len(set(answers.values())) == 1  # the same words whether or not the path exists
    assert "configured: demo, other" in answers["/etc"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = httpx.get(f"{origin}/api/fit", params={"model": "Qwen/Qwen2.5-7B"}, timeout=10)
    assert offline.status_code == 404 and "HF_HUB_OFFLINE" in offline.json()["error"]["message"]
    configured = httpx.get(f"{origin}/api/fit", params={"model": "demo"}, timeout=30)
    assert configured.status_code == 200 and configured.json()["plan"] is not None


def test_openapi_documents_the_openai_routes_with_400_not_422(door: Any) -> None:
    origin, _ = door
    document = httpx.get(f"{origin}/openapi.json", timeout=10).json()
    for path, request in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        operation = document["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{request}"}
        assert request in document["components"]["schemas"]
        assert {"200", "400", "404", "413", "415", "429", "502", "503", "507"} <= set(operation["responses"])
    assert "/v1/models" in document["paths"]
    assert "422" not in json.dumps(
        {p: {m: list(o["responses"]) for m, o in ops.items()} for p, ops in document["paths"].items()}
    )


def test_answers_match_the_documented_schemas(door: Any) -> None:
    origin, _ = door
    document = httpx.get(f"{origin}/openapi.json", timeout=10).json()
    ChatCompletion.model_validate(httpx.post(f"{origin}/v1/chat/completions", json=chat_body(), timeout=120).json())
    TextCompletion.model_validate(
        httpx.post(
            f"{origin}/v1/completions", json={"model": "demo", "prompt": "a", "max_tokens": 2}, timeout=120
        ).json()
    )
    ModelList.model_validate(httpx.get(f"{origin}/v1/models", timeout=10).json())
    assert ModelCard.model_validate(httpx.get(f"{origin}/v1/models/demo", timeout=10).json()).id == "demo"
    missing = httpx.get(f"{origin}/v1/models/{'x' * 5000}", timeout=10)
    assert missing.status_code == 404 and "(5,000 characters)" in missing.json()["error"]["message"]
    assert len(missing.content) < 1000  # a long name is not echoed whole
    for path, chunk, body in (
        ("/v1/chat/completions", ChatCompletionChunk, chat_body()),
        ("/v1/completions", TextCompletionChunk, {"model": "demo", "prompt": "a", "max_tokens": 3}),
    ):
        with httpx.stream(
            "POST",
            f"{origin}{path}",
            timeout=120,
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 4
        chunks = [chunk.model_validate_json(event) for event in events[:-1]]
        # the document's event schema: [DONE] (not JSON) is its own branch, the chunks the JSON branch's
        operation = document["paths"][path]["post"]
        branches = operation["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]
        json_branch = next(b for b in branches["anyOf"] if b.get("contentMediaType") == "application/json")
        assert {"const": "[DONE]"} in branches["anyOf"] and "[DONE]" not in json.dumps(json_branch)
        assert {"$ref": f"#/components/schemas/{chunk.__name__}"} in json_branch["contentSchema"]["anyOf"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk
