"""``forward`` end to end: real sockets on both sides (a uvicorn gateway in front, fake upstreams behind).

The gateway under test is a few lines of FastAPI that call ``forward`` and render ``MemserveError`` the
way the real app does. Its upstream clients are made in its lifespan, on its own event loop; the path's
first segment picks the upstream. Every request carries an ``x-test-id`` so ``on_done`` calls can be
counted per request.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from memserve.errors import MemserveError
from memserve.gateway.upstream import Upstream, forward
from memserve.pool.runner_transport import RunnerTransport
from memserve.wire.fake import NOT_JSON
from tests.serving import FakeOpenAI, ReceivedRequest, Script, nothing_listening, serve_app, serve_fake

API_KEY = "sk-test-123"
FALLBACK_HEADER = "x-memserve-fallback"
MODELS = ("my-model", "fake-model")
CHAT: dict[str, Any] = {"model": "my-model", "messages": [{"role": "user", "content": "say hello to me"}]}
SLOW_TOKENS = 200
SLOW = Script(reply_tokens=SLOW_TOKENS, token_gaps_seconds=(0.05,))  # 200 events, 50 ms apart: 10 s in all


class DoneLog:
    """``on_done`` calls per test id, recorded on the gateway's thread and read on the test's."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._changed = threading.Condition()

    def record(self, test_id: str) -> None:
        with self._changed:
            self._counts[test_id] += 1
            self._changed.notify_all()

    def count(self, test_id: str) -> int:
        with self._changed:
            return self._counts[test_id]

    def wait(self, test_id: str, timeout_seconds: float = 3.0) -> int:
        """The count once the first call came (a streamed response ends just after its last byte)."""
        with self._changed:
            self._changed.wait_for(lambda: self._counts[test_id] > 0, timeout=timeout_seconds)
            return self._counts[test_id]


@dataclass
class Stack:
    client: httpx.Client
    tcp: FakeOpenAI
    uds: FakeOpenAI
    down_url: str
    done: DoneLog


def make_gateway(tcp: FakeOpenAI, uds: FakeOpenAI, down_url: str, missing_socket: Path, done: DoneLog) -> FastAPI:
    upstreams: dict[str, Upstream] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        uds_transport = RunnerTransport(str(uds.uds))  # as the gateway reaches runners: straight to it
        missing_transport = RunnerTransport(str(missing_socket))
        async with (
            httpx.AsyncClient(timeout=5) as client,
            httpx.AsyncClient(transport=uds_transport, timeout=5) as uds_client,
            httpx.AsyncClient(transport=missing_transport, timeout=5) as missing_client,
            httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.3)) as impatient_client,
        ):
            upstreams.update(
                tcp=Upstream("provider fake", tcp.base_url, client),
                keyed=Upstream("provider fake", tcp.base_url, client, api_key=API_KEY),
                uds=Upstream("runner fake", "http://runner/v1", uds_client, transport=uds_transport),
                gone=Upstream("runner gone", "http://runner/v1", missing_client, transport=missing_transport),
                down=Upstream("provider down", down_url, client),
                impatient=Upstream("provider impatient", tcp.base_url, impatient_client),
            )
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(MemserveError)
    async def memserve_error(request: Request, exc: MemserveError) -> JSONResponse:
        return JSONResponse(exc.to_openai(), status_code=exc.status_code)

    @app.post("/{target}/v1/{endpoint:path}")
    async def proxy(target: str, endpoint: str, request: Request) -> Response:
        body = await request.json()
        test_id = request.headers["x-test-id"]
        return await forward(
            upstreams[target],
            f"/{endpoint}",
            body,
            stream=bool(body.get("stream")),
            on_done=lambda: done.record(test_id),
            headers={FALLBACK_HEADER: "fake"},
        )

    return app


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sockets = tmp_path_factory.mktemp("sockets")
    done = DoneLog()
    with (
        serve_fake(FakeOpenAI(models=MODELS)) as tcp,
        serve_fake(FakeOpenAI(models=MODELS), uds=sockets / "fake.sock") as uds,
        nothing_listening() as down_url,
    ):
        gateway = make_gateway(tcp, uds, down_url, sockets / "missing.sock", done)
        with serve_app(gateway, lifespan=True) as origin, httpx.Client(base_url=origin, timeout=10) as client:
            yield Stack(client, tcp, uds, down_url, done)


@pytest.fixture(autouse=True)
def fresh_fakes(stack: Stack) -> None:
    stack.tcp.reset()
    stack.uds.reset()


def fake_for(stack: Stack, target: str) -> FakeOpenAI:
    return stack.uds if target == "uds" else stack.tcp


def post(
    stack: Stack,
    target: str,
    body: dict[str, Any],
    endpoint: str = "chat/completions",
) -> tuple[httpx.Response, str]:
    test_id = uuid.uuid4().hex
    response = stack.client.post(f"/{target}/v1/{endpoint}", json=body, headers={"x-test-id": test_id})
    return response, test_id


def events(raw: bytes) -> list[bytes]:
    """The data of each SSE event (the streams here use one ``data:`` line per event)."""
    return [event.removeprefix(b"data: ") for event in raw.split(b"\n\n") if event]


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# --- answers that went well -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["tcp", "uds"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_whole_answer_passes_through_byte_for_byte(stack: Stack, target: str, endpoint: str) -> None:
    body: dict[str, Any] = CHAT if endpoint == "chat/completions" else {"model": "my-model", "prompt": "once upon"}
    response, test_id = post(stack, target, body, endpoint)
    fake = fake_for(stack, target)
    assert response.status_code == 200
    assert response.content == bytes(fake.sent[-1])
    assert response.json()["model"] == "my-model" and response.json()["usage"]["completion_tokens"] == 5
    assert response.headers[FALLBACK_HEADER] == "fake"
    assert fake.requests[-1].path == f"/v1/{endpoint}" and fake.requests[-1].body == body
    assert fake.requests[-1].authorization is None
    assert stack.done.wait(test_id) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_api_key_reaches_the_upstream_as_a_bearer_token(stack: Stack, stream: bool) -> None:
    response, test_id = post(stack, "keyed", {**CHAT, "stream": stream})
    assert response.status_code == 200
    assert stack.tcp.requests[-1].authorization == f"Bearer {API_KEY}"
    assert stack.done.wait(test_id) == 1
    assert API_KEY not in repr(Upstream("provider x", "http://x/v1", httpx.AsyncClient(), api_key=API_KEY))


@pytest.mark.parametrize("target", ["tcp", "uds"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_stream_is_relayed_byte_for_byte(stack: Stack, target: str, endpoint: str) -> None:
    body: dict[str, Any] = CHAT if endpoint == "chat/completions" else {"model": "my-model", "prompt": "once upon"}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response, test_id = post(stack, target, body, endpoint)
    fake = fake_for(stack, target)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers[FALLBACK_HEADER] == "fake"
    assert response.content == bytes(fake.sent[-1])
    data = events(response.content)
    assert data[-1] == b"[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 5
    assert all(json.loads(chunk)["model"] == "my-model" for chunk in data[:-1])
    assert stack.done.wait(test_id) == 1


# --- upstreams that answer badly ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_garbage_is_a_bad_upstream_naming_it(stack: Stack, stream: bool) -> None:
    stack.tcp.script = Script(not_json=NOT_JSON)
    response, test_id = post(stack, "tcp", {**CHAT, "stream": stream})
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "bad_upstream" and "provider fake" in error["message"]
    assert "text/plain" in error["message"] and "502 Bad Gateway" in error["message"]
    assert ("instead of text/event-stream" if stream else "answered 200") in error["message"]
    assert stack.done.wait(test_id) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_openai_errors_pass_through_with_status_and_retry_after(stack: Stack, stream: bool) -> None:
    stack.tcp.script = Script(error_status=429, error_headers={"Retry-After": "7"})
    response, test_id = post(stack, "tcp", {**CHAT, "stream": stream})
    assert response.status_code == 429
    assert response.content == bytes(stack.tcp.sent[-1])
    assert response.headers["retry-after"] == "7" and response.headers[FALLBACK_HEADER] == "fake"
    assert stack.done.wait(test_id) == 1


@pytest.mark.parametrize(
    ("status", "body", "expected_type", "expected_code", "expected_text"),
    [
        (404, {"detail": "Not Found"}, "not_found_error", None, "without an OpenAI error body"),
        (
            400,
            {
                "object": "error",
                "message": "maximum context length is 2048 tokens",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            "invalid_request_error",
            "BadRequestError",
            "maximum context length is 2048 tokens",
        ),
        (  # vLLM today: the same fields inside "error"
            400,
            {"error": {"message": "bad max_tokens", "type": "BadRequestError", "param": "max_tokens", "code": 400}},
            "invalid_request_error",
            "BadRequestError",
            "bad max_tokens",
        ),
        (  # llama.cpp's llama-server: its context overflow becomes OpenAI's code, with its numbers
            400,
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 700,
                    "n_ctx": 512,
                }
            },
            "invalid_request_error",
            "context_length_exceeded",
            "the prompt is 700 tokens, more than the 512 tokens of context",
        ),
    ],
)
def test_other_json_errors_are_rewrapped_in_the_openai_shape(
    stack: Stack, status: int, body: dict[str, Any], expected_type: str, expected_code: str | None, expected_text: str
) -> None:
    stack.tcp.script = Script(error_status=status, error_body=body)
    response, test_id = post(stack, "tcp", CHAT)
    assert response.status_code == status
    error = error_of(response)
    assert error["type"] == expected_type and error["code"] == expected_code
    assert error["message"].startswith("provider fake") and expected_text in error["message"]
    assert stack.done.wait(test_id) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_error_that_is_not_json_is_a_bad_upstream_with_its_status(stack: Stack, stream: bool) -> None:
    stack.tcp.script = Script(error_status=500, error_body="<html><h1>Internal    Server Error</h1></html>")
    response, test_id = post(stack, "tcp", {**CHAT, "stream": stream})
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "bad_upstream"
    assert "provider fake answered 500 (text/html" in error["message"]
    assert "<html><h1>Internal Server Error</h1></html>" in error["message"]
    assert stack.done.wait(test_id) == 1


# --- upstreams that cannot be reached or break off ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("target", "name"), [("down", "provider down"), ("gone", "runner gone")])
def test_unreachable_upstream_is_unavailable_naming_it(stack: Stack, stream: bool, target: str, name: str) -> None:
    response, test_id = post(stack, target, {**CHAT, "stream": stream})
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_unavailable" and "cannot be reached" in error["message"]
    base_url = stack.down_url if target == "down" else "http://runner/v1"
    assert error["message"].startswith(f"{name} at {base_url} ")
    assert stack.done.wait(test_id) == 1


def test_upstream_too_slow_to_answer_is_unavailable(stack: Stack) -> None:
    stack.tcp.script = Script(answer_delay_seconds=1.0)
    response, test_id = post(stack, "impatient", CHAT)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_unavailable"
    assert "provider impatient" in error["message"] and "did not answer in time" in error["message"]
    assert stack.done.wait(test_id) == 1


@pytest.mark.parametrize("die_mid_event", [False, True])
def test_stream_broken_off_ends_with_an_error_event_and_done(stack: Stack, die_mid_event: bool) -> None:
    stack.tcp.script = Script(die_after_tokens=2, die_mid_event=die_mid_event)
    response, test_id = post(stack, "tcp", {**CHAT, "stream": True})
    assert response.status_code == 200
    relayed = bytes(stack.tcp.sent[-1])
    assert relayed.count(b"\n\n") == 3  # the role chunk and two tokens (plus half an event)
    assert relayed.endswith(b"half-an-ev") is die_mid_event
    assert response.content.startswith(relayed)
    rest = response.content[len(relayed) :]
    if die_mid_event:
        assert rest.startswith(b"\n\n")
    error_data, done_data = events(rest)
    assert done_data == b"[DONE]"
    error = json.loads(error_data)["error"]
    assert error["code"] == "upstream_unavailable"
    assert error["message"].startswith(f"provider fake broke off the stream after {len(relayed)} bytes")
    assert "incomplete" in error["message"] and "Retry" in error["message"]
    assert stack.done.wait(test_id) == 1


def test_stream_that_stalls_past_the_read_timeout_ends_with_an_error_event(stack: Stack) -> None:
    stack.tcp.script = Script(first_token_delays_seconds=(2.0,))  # nothing at all for 2 s
    response, test_id = post(stack, "impatient", {**CHAT, "stream": True})
    assert response.status_code == 200
    error_data, done_data = events(response.content)
    assert done_data == b"[DONE]"
    assert "provider impatient stopped sending after 0 bytes (ReadTimeout" in json.loads(error_data)["error"]["message"]
    assert stack.tcp.disconnected.wait(1.0), "the stalled upstream was not closed"
    assert stack.done.wait(test_id) == 1


# --- the client going away ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["tcp", "uds"])
def test_client_disconnect_closes_the_upstream_promptly(stack: Stack, target: str) -> None:
    fake = fake_for(stack, target)
    fake.script = SLOW  # 10 s if nobody hangs up
    test_id = uuid.uuid4().hex
    with stack.client.stream(
        "POST", f"/{target}/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-test-id": test_id}
    ) as response:
        # Held, not looped over with ``for ... break``: the break would drop the last reference to the
        # generator, whose close makes httpcore close the connection there and then, so the client would
        # already be gone while the asserts below still expect it connected (a race the gateway won on a
        # busy machine). The client hangs up only when this ``with`` closes the response.
        chunks = response.iter_raw()
        received = b""
        while len(events(received)) < 4:
            chunk = next(chunks, None)
            assert chunk is not None, f"the stream ended after {received!r}"
            received += chunk
        # relayed as they arrived: the upstream is still far from its last event
        assert len(events(bytes(fake.sent[-1]))) < SLOW_TOKENS, "the stream was buffered"
        assert stack.done.count(test_id) == 0, "on_done ran while the stream was still going"
        assert not fake.disconnected.is_set()
    assert fake.disconnected.wait(2.0), "the upstream never saw the client go away"
    assert len(events(bytes(fake.sent[-1]))) < SLOW_TOKENS  # cut off, not run to its end
    assert stack.done.wait(test_id) == 1
    assert received == bytes(fake.sent[-1])[: len(received)]


def test_relay_closes_the_upstream_when_a_send_fails(stack: Stack) -> None:
    """ASGI 2.4 servers report a gone client by failing ``send``: the relay is then suspended at a ``yield``,
    which only an explicit close (not starlette, not the garbage collector while we hold it) ends."""
    stack.tcp.script = SLOW
    done_calls: list[str] = []

    async def send_until_gone(scope: dict[str, Any]) -> bool:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            if len(sent) == 3:
                raise OSError("the client went away")
            sent.append(message)

        async def receive() -> Any:
            await asyncio.Event().wait()

        async with httpx.AsyncClient(timeout=5) as client:
            upstream = Upstream("provider fake", stack.tcp.base_url, client)
            response = await forward(
                upstream,
                "/chat/completions",
                {**CHAT, "stream": True},
                stream=True,
                on_done=lambda: done_calls.append("done"),
            )
            with pytest.raises(ClientDisconnect):
                await response(scope, receive, send)
            return await asyncio.to_thread(stack.tcp.disconnected.wait, 1.0)  # response still referenced

    assert asyncio.run(send_until_gone({"type": "http", "asgi": {"spec_version": "2.4"}}))
    assert done_calls == ["done"]


def test_a_body_given_as_bytes_reaches_the_upstream_unchanged(stack: Stack) -> None:
    """The gateway relays a client's body as its own bytes when it changes nothing in it."""
    raw = b'{ "messages": [{"role": "user", "content": "h\\u00e9llo"}],\n  "model": "fake-model" }'

    async def send() -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await forward(
                Upstream("provider fake", stack.tcp.base_url, client), "/chat/completions", raw, stream=False
            )
            return response.status_code

    assert asyncio.run(send()) == 200
    received = stack.tcp.requests[-1]
    assert received.raw == raw
    assert received.body == json.loads(raw)


def test_the_upstream_module_imports_neither_torch_nor_the_runner() -> None:
    code = (
        "import sys, memserve.gateway.upstream\n"
        "print(sorted({'torch', 'transformers', 'memserve.runner'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert result.stdout.strip() == "[]"


# --- the fake itself ------------------------------------------------------------------------------------------


def test_fake_lists_its_models_and_records_the_request(stack: Stack) -> None:
    models = httpx.get(f"{stack.tcp.base_url}/models", headers={"Authorization": "Bearer k"}).json()
    assert [m["id"] for m in models["data"]] == list(MODELS)
    assert stack.tcp.requests[-1] == ReceivedRequest("GET", "/v1/models", None, "Bearer k")
