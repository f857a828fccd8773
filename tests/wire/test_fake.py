"""The fake OpenAI server's own promises (bench and the gateway tests lean on them)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi.testclient import TestClient

from memserve.wire.fake import FakeOpenAI, Script, serve_fake
from memserve.wire.schema import ChatCompletion, ChatCompletionChunk, TextCompletion

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "three words here"}]}


def client(script: Script | None = None) -> tuple[FakeOpenAI, TestClient]:
    fake = FakeOpenAI(script=script)
    return fake, TestClient(fake)  # type: ignore[arg-type]


def events(raw: bytes) -> list[Any]:
    data = [event.removeprefix(b"data: ") for event in raw.split(b"\n\n") if event]
    return [d.decode() if d == b"[DONE]" else json.loads(d) for d in data]


def test_the_answer_is_the_reply_or_exactly_max_tokens_of_it() -> None:
    fake, http = client()
    whole = ChatCompletion.model_validate(http.post("/v1/chat/completions", json=CHAT).json())
    assert whole.choices[0].message.content == "Hello from the fake upstream."
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == 3  # words
    response = http.post("/v1/completions", json={"model": "fake-model", "prompt": "a b", "max_tokens": 7})
    longer = TextCompletion.model_validate(response.json())
    assert longer.choices[0].text == "Hello from the fake upstream. Hello from"
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 7
    assert response.content == bytes(fake.sent[-1])
    assert [(r.path, r.body) for r in fake.requests] == [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "fake-model", "prompt": "a b", "max_tokens": 7}),
    ]


def test_a_stream_is_memserves_chunks_then_usage_when_asked_then_done() -> None:
    fake, http = client()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.content)
    assert chunks[-1] == "[DONE]" and response.content == bytes(fake.sent[-1])
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == "Hello from the fake upstream."
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == 5
    without = events(http.post("/v1/chat/completions", json={**CHAT, "stream": True}).content)
    assert without[-2]["choices"][0]["finish_reason"] == "stop"  # no usage chunk unless asked


def test_an_unknown_model_is_a_404_naming_it() -> None:
    _, http = client()
    response = http.post("/v1/chat/completions", json={**CHAT, "model": "other"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "model 'other' is not served here",
        "type": "not_found_error",
        "param": None,
        "code": "model_not_found",
    }


def test_scripted_failures() -> None:
    _, http = client(Script(error_status=429, error_headers={"Retry-After": "7"}))
    refused = http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["code"] == "fake_failure"

    _, http = client(Script(error_after_tokens=2))
    chunks = events(http.post("/v1/chat/completions", json={**CHAT, "stream": True}).content)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "generation_failed"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]] == ["Hello", " from"]

    _, http = client(Script(not_json="<html>down</html>"))
    garbage = http.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
    assert garbage.status_code == 200 and garbage.text == "<html>down</html>"
    assert garbage.headers["content-type"].startswith("text/plain")


def test_a_held_stream_sends_nothing_more_until_released() -> None:
    body = {**CHAT, "stream": True}
    with (
        serve_fake(FakeOpenAI(script=Script(reply_tokens=4, hold_after_tokens=1))) as fake,
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json=body) as response,
    ):
        lines = (line for line in response.iter_lines() if line)
        texts = []
        for line in lines:
            chunk = json.loads(line.removeprefix("data: "))
            texts.append(chunk["choices"][0]["delta"].get("content"))
            if texts[-1]:
                break
        assert texts == [None, "Hello"] and fake.held.wait(timeout=30)  # the role chunk, the first token, the hold
        sent = bytes(fake.sent[-1])
        assert sent.count(b"data: ") == 2  # and nothing after it while held
        fake.release()
        rest = list(lines)
    assert rest[-1] == "data: [DONE]" and len(rest) == 3 + 2  # three more tokens, the finish chunk, [DONE]


def test_a_release_before_the_hold_point_is_kept_and_a_reset_holds_anew() -> None:
    fake, http = client(Script(reply_tokens=3, hold_after_tokens=2))
    fake.release()
    chunks = events(http.post("/v1/chat/completions", json={**CHAT, "stream": True}).content)
    assert chunks[-1] == "[DONE]" and fake.held.is_set()
    fake.reset(Script(hold_after_tokens=1))
    assert not fake.held.is_set()  # a new script holds anew
