"""The runner's OpenAI-compatible app against a scripted engine and the tiny demo model's real tokenizer.

Most tests go through Starlette's TestClient; client disconnects are driven through raw ASGI calls (a
test client cannot hang up mid-response); one test serves the app with uvicorn on 127.0.0.1 and talks
to it with the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from memserve.runner.app import create_app
from tests.runner.fakes import FakeEngine
from tests.serving import serve_app

MODEL = "tiny"
CONTEXT_TOKENS = 64
TEXT = "Hello world! héllo 日本 🎉"  # multi-byte characters split over several byte-level tokens
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
COMPLETION = {"model": MODEL, "prompt": "once upon a time"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}

T = TypeVar("T")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def text_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split()), "the demo tokenizer should split this text finely"
    return list(ids)


def make_app(
    engine: FakeEngine,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_tokens: int = CONTEXT_TOKENS,
    stop_token_ids: tuple[int, ...] | None = None,
) -> FastAPI:
    return create_app(
        engine=engine,
        tokenizer=tokenizer,
        model_name=MODEL,
        context_tokens=context_tokens,
        health=lambda: {"state": "ready", "plan": {"rung": "cpu"}, "memory": {"cpu": 1}},
        stop_token_ids=stop_token_ids,
    )


@pytest.fixture
def engine(text_ids: list[int]) -> FakeEngine:
    return FakeEngine(text_ids)


@pytest.fixture
def client(engine: FakeEngine, tokenizer: PreTrainedTokenizerBase) -> TestClient:
    return TestClient(make_app(engine, tokenizer))


def events(response: Any) -> list[Any]:
    """The SSE data payloads, parsed (``[DONE]`` stays a string)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def assert_error(response: Any, status: int, error_type: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["param"] == param
    assert error["code"] is None or isinstance(error["code"], str)
    return str(error["message"])


# --- chat and completions ------------------------------------------------------------------------------


def test_chat_answer_has_the_openai_shape(
    client: TestClient, engine: FakeEngine, tokenizer: Any, text_ids: list[int]
) -> None:
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": TEXT}, "logprobs": None, "finish_reason": "stop"}
    ]
    prompt = chat_prompt_ids(tokenizer, "hi there")
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(text_ids),
        "total_tokens": len(prompt) + len(text_ids),
    }
    request = engine.requests[-1]
    assert list(request.prompt_ids) == prompt and request.request_id == body["id"]
    assert request.max_new_tokens == CONTEXT_TOKENS - len(prompt)  # default: all the room that is left
    assert request.stop_token_ids == (tokenizer.eos_token_id,) and request.temperature == 1.0
    assert engine.open == set()


def test_chat_stream_chunks_role_deltas_finish_and_done(client: TestClient, engine: FakeEngine) -> None:
    chunks = events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert {(c["id"], c["created"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk")
    }
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    texts = [d["content"] for d in deltas[1:-1]]
    assert "".join(texts) == TEXT and all(texts) and not any("\ufffd" in t for t in texts)
    assert engine.open == set()


def test_stream_include_usage_adds_a_usage_chunk_before_done(client: TestClient, text_ids: list[int]) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(client.post("/v1/chat/completions", json=body))
    usage_chunk, done = chunks[-2:]
    assert done == "[DONE]" and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(text_ids)
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + len(text_ids)
    assert all(c["usage"] is None for c in chunks[:-2])


@pytest.mark.parametrize("prompt", ["once upon a time", ["once upon a time"], "ids", ["ids"]])
def test_completions_accept_one_prompt_in_every_form(
    client: TestClient, engine: FakeEngine, tokenizer: Any, prompt: Any
) -> None:
    ids = tokenizer.encode("once upon a time")
    prompt = ids if prompt == "ids" else [ids] if prompt == ["ids"] else prompt
    body = client.post("/v1/completions", json={**COMPLETION, "prompt": prompt}).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "stop"}]
    assert list(engine.requests[-1].prompt_ids) == ids
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_completions_stream(client: TestClient) -> None:
    chunks = events(
        client.post("/v1/completions", json={**COMPLETION, "stream": True, "stream_options": {"include_usage": True}})
    )
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == [] and chunks[-2]["usage"]["total_tokens"] > 0
    choices = [c["choices"][0] for c in chunks[:-2]]
    assert all(c["object"] == "text_completion" for c in chunks[:-2])
    assert "".join(c["text"] for c in choices) == TEXT
    assert choices[-1] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


def test_content_parts_are_joined(client: TestClient, engine: FakeEngine, tokenizer: Any) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], "user": "ignored", "foo": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert list(engine.requests[-1].prompt_ids) == chat_prompt_ids(tokenizer, "hi\nthere")


def test_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = {
        **CHAT,
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "n": 1,
        "frequency_penalty": 0,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "logprobs": False,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    request = engine.requests[-1]
    assert (request.temperature, request.top_p, request.seed) == (0.3, 0.9, 7)


def test_generation_config_stop_ids_add_to_eos(engine: FakeEngine, tokenizer: Any) -> None:
    client = TestClient(make_app(engine, tokenizer, stop_token_ids=(5, tokenizer.eos_token_id)))
    client.post("/v1/chat/completions", json=CHAT)
    assert engine.requests[-1].stop_token_ids == (tokenizer.eos_token_id, 5)


# --- stop strings and limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_text_and_closes_the_engine_iterator(
    client: TestClient, engine: FakeEngine, text_ids: list[int], stream: bool
) -> None:
    body = {**CHAT, "stop": ["nothing", "llo 日"], "stream": stream, "stream_options": {"include_usage": True}}
    response = client.post("/v1/chat/completions", json=body)
    if stream:
        chunks = events(response)
        texts = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3]]
        text, finish, usage = "".join(texts), chunks[-3]["choices"][0]["finish_reason"], chunks[-2]["usage"]
    else:
        answer = response.json()
        [choice] = answer["choices"]
        text, finish, usage = choice["message"]["content"], choice["finish_reason"], answer["usage"]
    assert text == "Hello world! hé" and finish == "stop"
    assert 0 < usage["completion_tokens"] < len(text_ids)
    assert engine.closed_early == [engine.requests[-1].request_id] and engine.open == set()


def test_text_that_may_start_a_stop_string_is_held_then_released(client: TestClient) -> None:
    body = {**CHAT, "stop": "🎉!", "stream": True}  # the text ends in "🎉": a stop's prefix, never completed
    chunks = events(client.post("/v1/chat/completions", json=body))
    texts = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert "".join(texts) == TEXT
    assert not any(t.endswith("🎉") for t in texts[:-1])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_ends_with_length(client: TestClient, engine: FakeEngine, field: str) -> None:
    answer = client.post("/v1/chat/completions", json={**CHAT, field: 3}).json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    assert engine.requests[-1].max_new_tokens == 3


def test_max_tokens_past_the_room_left_is_a_400_with_both_numbers(
    client: TestClient, engine: FakeEngine, tokenizer: Any
) -> None:
    prompt_tokens = len(chat_prompt_ids(tokenizer, "hi there"))
    room = CONTEXT_TOKENS - prompt_tokens
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": room + 1})
    message = assert_error(response, 400, "invalid_request_error", "max_tokens")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert f"{prompt_tokens} in the prompt" in message and str(CONTEXT_TOKENS) in message and str(room) in message
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": room}).status_code == 200
    assert engine.requests[-1].max_new_tokens == room
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # no max_tokens: all the room
    assert engine.requests[-1].max_new_tokens == room


def test_a_prompt_whose_bytes_prove_it_too_long_is_refused_before_tokenizing(
    client: TestClient, engine: FakeEngine, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    longest = max(len(piece.encode()) for piece in tokenizer.get_vocab())
    words = "x" * (CONTEXT_TOKENS * longest + 1)
    encoded: list[str] = []
    monkeypatch.setattr(type(tokenizer), "encode", lambda self, text, **kw: encoded.append(text) or [1])
    requests = len(engine.requests)
    for route, param, body in (
        ("/v1/completions", "prompt", {**COMPLETION, "prompt": words}),
        ("/v1/chat/completions", "messages", {**CHAT, "messages": [{"role": "user", "content": words}]}),
    ):
        response = client.post(route, json=body)
        message = assert_error(response, 400, "invalid_request_error", param)
        assert response.json()["error"]["code"] == "context_length_exceeded" and "bytes" in message
    assert encoded == [] and len(engine.requests) == requests


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_prompt_longer_than_the_context_is_a_400_with_both_numbers(
    client: TestClient, tokenizer: Any, route: str
) -> None:
    words = "memory " * 100
    if route == "chat":
        response = client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": words}]})
        prompt_tokens, param = len(chat_prompt_ids(tokenizer, words)), "messages"
    else:
        response = client.post("/v1/completions", json={**COMPLETION, "prompt": words})
        prompt_tokens, param = len(tokenizer.encode(words)), "prompt"
    message = assert_error(response, 400, "invalid_request_error", param)
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert str(prompt_tokens) in message and str(CONTEXT_TOKENS) in message


# --- bad input: 400 in the OpenAI shape, and the server stays up -----------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**CHAT, "n": 2}, "n", "unsupported"),
        ({**CHAT, "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens", "valid integer"),
        ({**CHAT, "temperature": "hot"}, "temperature", "valid number"),
        ({**CHAT, "stream": "sometimes"}, "stream", "valid boolean"),
        ({**CHAT, "stream": "true"}, "stream", "valid boolean"),
        ({**CHAT, "stream": 1}, "stream", "valid boolean"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({**CHAT, "messages": []}, "messages", "at least 1"),
        ({"model": MODEL}, "messages", "missing required parameter 'messages'"),
        ({"messages": CHAT["messages"]}, "model", "missing required parameter 'model'"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "content[0].image_url must be",
        ),
        (  # a text-only model: the gateway's door says the same before any load
            {"model": MODEL, "messages": [{"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "hi"}]}]},
            "messages[0].content[0].image_url",
            f"the model '{MODEL}' takes no images",
        ),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'user'"),
        ({**CHAT, "logprobs": True}, "logprobs", "unsupported"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs", "unsupported"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "unsupported"),
        ({**CHAT, "logit_bias": {"5": 10}}, "logit_bias", "unsupported"),
        ({**CHAT, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported"),
        ({**CHAT, "presence_penalty": -1}, "presence_penalty", "unsupported"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str, words: str
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    message = assert_error(response, 400, "invalid_request_error", param)
    assert words in message
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**COMPLETION, "prompt": ["one", "two"]}, "prompt", "several prompts per request is unsupported"),
        ({**COMPLETION, "prompt": [[1, 2], [3]]}, "prompt", "send one request per prompt"),
        ({**COMPLETION, "prompt": {"text": "x"}}, "prompt", "list of token ids"),
        ({**COMPLETION, "prompt": [1, 99999]}, "prompt", "99999"),
        ({**COMPLETION, "prompt": ""}, "prompt", "empty"),
        ({**COMPLETION, "echo": True}, "echo", "unsupported"),
        ({**COMPLETION, "suffix": "end"}, "suffix", "unsupported"),
        ({**COMPLETION, "logprobs": 1}, "logprobs", "unsupported"),
        ({**COMPLETION, "best_of": 3}, "best_of", "unsupported"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str, words: str
) -> None:
    message = assert_error(client.post("/v1/completions", json=body), 400, "invalid_request_error", param)
    assert words in message


@pytest.mark.parametrize(
    ("content", "headers", "words"),
    [
        (b'{"model": "tiny", "messages": [', {"content-type": "application/json"}, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, "JSON object"),
        (b'{"model": "tiny"}', {"content-type": "text/plain"}, "Content-Type: application/json"),
        (b"", {"content-type": "application/json"}, "JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(
    client: TestClient, content: bytes, headers: dict[str, str], words: str
) -> None:
    response = client.post("/v1/chat/completions", content=content, headers=headers)
    assert words in assert_error(response, 400, "invalid_request_error", None)


def test_unknown_route_wrong_method_and_wrong_model(client: TestClient) -> None:
    assert "no route GET /v1/nothing" in assert_error(client.get("/v1/nothing"), 404, "not_found_error")
    assert_error(client.get("/v1/chat/completions"), 405, "invalid_request_error")
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
    assert "'tiny', not 'other'" in assert_error(response, 404, "not_found_error", "model")


# --- engine trouble -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "on_call"), [(False, False), (True, False), (True, True)])
def test_full_queue_is_a_429_with_retry_after(
    client: TestClient, engine: FakeEngine, stream: bool, on_call: bool
) -> None:
    engine.queue_full, engine.queue_full_on_call = not on_call, on_call
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert "2 sequences running, 8 waiting" in assert_error(response, 429, "rate_limit_error")
    assert response.headers["retry-after"] == "3"


def test_engine_failure_mid_stream_is_an_error_event_then_done(engine: FakeEngine, tokenizer: Any) -> None:
    engine.fail_after = 3
    client = TestClient(make_app(engine, tokenizer))
    chunks = events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert chunks[-1] == "[DONE]"
    error = chunks[-2]["error"]
    assert error["type"] == "api_error" and "broke down" in error["message"] and error["param"] is None
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])  # some text came first
    assert engine.open == set()


def test_engine_failure_without_stream_is_a_500(engine: FakeEngine, tokenizer: Any) -> None:
    engine.fail_after = 3
    client = TestClient(make_app(engine, tokenizer), raise_server_exceptions=False)
    message = assert_error(client.post("/v1/chat/completions", json=CHAT), 500, "api_error")
    assert "broke down" in message and engine.open == set()
    assert client.get("/health").status_code == 200


# --- models, health, stats ------------------------------------------------------------------------------


def test_models_health_and_stats(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["owned_by"] == "memserve"
    assert isinstance(model["created"], int)
    assert client.get("/health").json() == {
        "state": "ready",
        "plan": {"rung": "cpu"},
        "memory": {"cpu": 1},
        "engine": "fake",
    }
    stats = client.get("/stats").json()
    assert stats["running"] == 0 and stats["prompt_tokens_total"] == 17 and stats["requests_total"] == 3


# --- shutdown ---------------------------------------------------------------------------------------------


def test_shutdown_closes_the_engine_once(engine: FakeEngine, tokenizer: Any) -> None:
    with TestClient(make_app(engine, tokenizer)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert engine.close_calls == 0
    assert engine.close_calls == 1


async def run_lifespan(app: FastAPI, while_up: Callable[[], Awaitable[T]]) -> T:
    """Start ``app`` through the ASGI lifespan protocol, await ``while_up()``, then shut the app down."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[str] = []
    await messages.put({"type": "lifespan.startup"})

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    server = asyncio.create_task(app(scope, messages.get, send))
    while "lifespan.startup.complete" not in sent:
        assert not server.done(), sent
        await asyncio.sleep(0.001)
    result = await while_up()
    await messages.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(server, timeout=5)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    return result


def test_shutdown_fails_a_stream_in_flight_cleanly(tokenizer: Any) -> None:
    engine = FakeEngine(list(range(40, 240)), delay_seconds=0.01)  # 2 s of tokens
    app = make_app(engine, tokenizer, context_tokens=1024)

    async def stream_started() -> asyncio.Task[tuple[list[bytes], set[str]]]:
        call = asyncio.create_task(call_and_hang_up(app, engine, "/v1/chat/completions", {**CHAT, "stream": True}))
        while engine.yielded < 3:
            await asyncio.sleep(0.005)
        return call

    async def scenario() -> tuple[list[bytes], set[str]]:
        call = await run_lifespan(app, stream_started)
        return await call

    chunks, still_open = asyncio.run(scenario())
    assert engine.close_calls == 1 and still_open == set() and engine.yielded < 100
    payloads = [line[len("data: ") :] for line in b"".join(chunks).decode().splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "api_error" and "the engine was closed" in error["message"]


# --- client disconnects ---------------------------------------------------------------------------------


async def call_and_hang_up(
    app: FastAPI,
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    *,
    after_chunks: int | None = None,
    after_seconds: float | None = None,
    stall: bool = False,
) -> tuple[list[bytes], set[str]]:
    """Call the app over raw ASGI and hang up after some body chunks or some time.

    Returns the chunks received and the engine's open sequences *the moment the app returns*: checked
    later, ``asyncio.run`` closing leftover generators at shutdown would hide a leak. ``stall`` makes
    ``send`` block at the hang-up, as on a full socket, so the body is cancelled while suspended.
    """
    chunks: list[bytes] = []
    gone = asyncio.Event()
    request = {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def receive() -> dict[str, Any]:
        nonlocal request
        if request:
            message, request = request, {}
            return message
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if after_chunks is not None and len(chunks) >= after_chunks:
                gone.set()
                if stall:
                    await asyncio.Event().wait()

    async def hang_up_later() -> None:
        if after_seconds is not None:
            await asyncio.sleep(after_seconds)
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    timer = asyncio.create_task(hang_up_later())
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    still_open = set(engine.open)
    await timer
    return chunks, still_open


@pytest.mark.parametrize("stall", [False, True])
def test_disconnect_mid_stream_closes_the_engine_iterator(tokenizer: Any, stall: bool) -> None:
    engine = FakeEngine(list(range(40, 240)), delay_seconds=0.01)
    app = make_app(engine, tokenizer, context_tokens=1024)
    body = {**CHAT, "stream": True}
    chunks, still_open = asyncio.run(
        call_and_hang_up(app, engine, "/v1/chat/completions", body, after_chunks=4, stall=stall)
    )
    assert len(chunks) >= 4 and b"[DONE]" not in b"".join(chunks)
    assert still_open == set() and engine.closed_early == [engine.requests[0].request_id]
    assert engine.yielded < 100


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_the_first_token_closes_the_engine_iterator(tokenizer: Any, stream: bool) -> None:
    engine = FakeEngine([40, 41, 42], first_delay_seconds=30)  # a long prefill
    app = make_app(engine, tokenizer)
    body = {**CHAT, "stream": stream}
    hang_up = call_and_hang_up(app, engine, "/v1/chat/completions", body, after_seconds=0.1)
    _, still_open = asyncio.run(hang_up)
    assert still_open == set() and engine.closed_early == [engine.requests[0].request_id]
    assert engine.yielded == 0


def test_disconnect_during_a_non_streamed_answer_closes_the_engine_iterator(tokenizer: Any) -> None:
    engine = FakeEngine(list(range(40, 240)), delay_seconds=0.01)
    app = make_app(engine, tokenizer, context_tokens=1024)
    hang_up = call_and_hang_up(app, engine, "/v1/completions", COMPLETION, after_seconds=0.1)
    _, still_open = asyncio.run(hang_up)
    assert still_open == set() and engine.closed_early == [engine.requests[0].request_id]
    assert engine.yielded < 100


# --- the official openai client against a real server ----------------------------------------------------


def test_official_openai_client_against_uvicorn(engine: FakeEngine, tokenizer: Any, text_ids: list[int]) -> None:
    openai = pytest.importorskip("openai")
    messages = [{"role": "user", "content": "hi there"}]
    with (
        serve_app(make_app(engine, tokenizer)) as base,
        openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client,
    ):
        chat = client.chat.completions.create(model=MODEL, messages=messages)
        assert chat.choices[0].message.content == TEXT and chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and chat.usage.completion_tokens == len(text_ids)

        stream = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text_ids)

        completion = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
        assert completion.choices[0].finish_reason == "length" and completion.usage is not None
        pieces = list(client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4, stream=True))
        assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text

        with pytest.raises(openai.BadRequestError, match="unsupported"):
            client.chat.completions.create(model=MODEL, messages=messages, n=2)
        engine.queue_full = True
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert raised.value.response.headers["retry-after"] == "3"
        engine.queue_full = False

        engine.fail_after = 2
        with pytest.raises(openai.APIError, match="broke down"):
            list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
        engine.fail_after = None

        # a real hang-up: the server notices and frees the sequence
        engine.tokens, engine.delay_seconds, engine.yielded = list(range(40, 1000)), 0.05, 0
        with (
            httpx.Client(base_url=base) as http,
            http.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as response,
        ):
            for n, _ in enumerate(response.iter_lines()):
                if n >= 3:
                    break
        deadline = time.monotonic() + 3
        while engine.open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.open == set() and engine.closed_early and engine.yielded < 30
