"""The stream meter as a table: which bytes reach the client, and what it counted; a whole answer metered from
the relay's own parse. Plain bytes, no server."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from memserve.gateway import metering
from memserve.gateway.metering import answer_metered, metered
from memserve.gateway.upstream import StreamUsage, WholeAnswer
from memserve.store.usage import UsageRow


def event(payload: dict[str, object]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


ROLE = event({"choices": [{"index": 0, "delta": {"role": "assistant"}}], "usage": None})
TEXT = event({"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None})
EMPTY = event({"choices": [{"index": 0, "delta": {"content": ""}}], "usage": None})
FINISH = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
SPACED_USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
DONE = b"data: [DONE]\n\n"
HALF = b'data: {"choices": [{"delta": {"content": "x'  # a stream that broke off mid-event


def CRLF(event: bytes) -> bytes:  # reads as the delimiter it makes
    return event.replace(b"\n\n", b"\r\n\r\n")


@pytest.mark.parametrize(
    ("chunks", "strip", "sent", "usage", "texts"),
    [
        ([ROLE, TEXT, TEXT, FINISH, USAGE, DONE], True, ROLE + TEXT + TEXT + FINISH + DONE, 2, 2),
        ([ROLE, TEXT, TEXT, FINISH, USAGE, DONE], False, ROLE + TEXT + TEXT + FINISH + USAGE + DONE, 2, 2),
        ([ROLE + TEXT, TEXT + FINISH + USAGE + DONE], True, ROLE + TEXT + TEXT + FINISH + DONE, 2, 2),  # merged
        ([TEXT, EMPTY, FINISH, SPACED_USAGE, DONE], True, TEXT + EMPTY + FINISH + DONE, 2, 1),  # another's JSON
        ([ROLE, TEXT, TEXT], True, ROLE + TEXT + TEXT, None, 2),  # cut short: no usage, the texts sent
        ([TEXT[:-1], TEXT[-1:] + USAGE[:-1], USAGE[-1:] + DONE], True, TEXT + DONE, 2, 1),  # ends split
        ([TEXT + USAGE[:30], USAGE[30:] + DONE], True, TEXT + DONE, 2, 1),  # the usage event split
        ([CRLF(TEXT) + CRLF(USAGE) + CRLF(DONE)], True, CRLF(TEXT) + CRLF(DONE), 2, 1),  # \r\n\r\n
        (
            [TEXT, b'data: {"choices": [{"delta": {"content": "x'],
            True,
            TEXT + b'data: {"choices": [{"delta": {"content": "x',
            None,
            2,
        ),
    ],
    ids=[
        "stripped",
        "asked for",
        "events merged in chunks",
        "spaced JSON, empty text",
        "cut short",
        "delimiter split across chunks",
        "usage event split across chunks",
        "CRLF delimiters",
        "an unfinished event is passed on at the end",
    ],
)
def test_what_the_client_gets_and_what_is_counted(
    chunks: list[bytes], strip: bool, sent: bytes, usage: int | None, texts: int
) -> None:
    heard: list[int] = []
    meter = StreamUsage(strip=strip, on_text=heard.append)
    assert b"".join(meter.feed(c) for c in chunks) + meter.rest() == sent
    assert (meter.usage or {}).get("completion_tokens") == usage
    assert meter.text_events == sum(heard) == texts


def test_a_renamed_stream_names_the_model_as_asked_wherever_its_chunks_split() -> None:
    """llama-server answers its alias (the base) for an adapter request: the meter renames each event's model,
    whole events only, so a split ``"model":"g"`` is renamed too; a text that quotes it (escaped) is not."""

    def named(payload: dict[str, object]) -> bytes:
        return event({**payload, "model": "g"})

    quoted = {"choices": [{"index": 0, "delta": {"content": '{"model":"g"}'}}]}
    stream = named(quoted) + named({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    stream += named({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}) + DONE
    want = stream.replace(b'"model":"g"', b'"model":"g:ad2"')
    for split in range(1, len(stream)):
        meter = StreamUsage(strip=False)
        meter.rename = (b'"model":"g"', b'"model":"g:ad2"')
        got = meter.feed(stream[:split]) + meter.feed(stream[split:]) + meter.rest()
        assert got == want, split
        chunks = [json.loads(line[6:]) for line in got.split(b"\n\n") if line.startswith(b"data: {")]
        assert [c["model"] for c in chunks] == ["g:ad2"] * 3 and chunks[0]["choices"][0]["delta"]["content"] == (
            '{"model":"g"}'
        )


def test_a_stream_asks_for_usage_only_when_its_client_did_not() -> None:
    body = {"model": "m", "stream": True}
    sent, meter = metered(body, True)
    assert sent == {**body, "stream_options": {"include_usage": True}} and meter is not None and meter.strip
    asked = {**body, "stream_options": {"include_usage": True}}
    sent, meter = metered(asked, True)
    assert sent is asked and meter is not None and not meter.strip
    assert metered(body, False) == (body, None)
    odd = {**body, "stream_options": "yes"}  # the provider judges it; nothing is added
    sent, meter = metered(odd, True)
    assert sent is odd and meter is not None and not meter.strip


def test_a_whole_answer_is_parsed_once_its_usage_read_from_the_relays_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay parsed the upstream's answer (``WholeAnswer``); the record reads that object, not the bytes again."""
    answer = {"id": "c1", "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    raw = json.dumps(answer).encode()

    def parsed_again(raw: bytes) -> dict[str, Any]:
        raise AssertionError("the whole answer was parsed a second time")

    monkeypatch.setattr(metering, "_json_object", parsed_again)
    rows: list[UsageRow] = []
    meters = SimpleNamespace(usage=SimpleNamespace(record=rows.append), metrics=None)

    async def handler(request: Request) -> Response:
        return WholeAnswer(raw, answer, status_code=200, headers={})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/chat/completions", "headers": [], "state": {"caller": None}}
    asyncio.run(answer_metered(handler, scope, receive, send, meters, what="a test"))  # type: ignore[arg-type]
    assert sent[-1]["body"] == raw  # the client gets the upstream's own bytes
    [row] = rows
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (5, 3, 200)
