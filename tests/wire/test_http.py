"""until_disconnected: the work runs in the caller's task and is cancelled only when the client leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from memserve.errors import InvalidArgument
from memserve.wire.http import client_json, json_object, until_disconnected


class Client:
    """An ASGI ``receive`` whose client leaves when the test says so."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_the_works_result_comes_back_and_the_watcher_is_gone() -> None:
    async def scenario() -> None:
        client = Client()
        before = len(asyncio.all_tasks())

        async def work() -> str:
            await asyncio.sleep(0)
            return "answer"

        assert await until_disconnected(client.receive, work()) == "answer"
        await asyncio.sleep(0)  # the cancelled watcher's last step
        assert len(asyncio.all_tasks()) == before

    asyncio.run(scenario())


def test_a_client_that_leaves_cancels_the_work_and_nothing_after_it() -> None:
    async def scenario() -> None:
        client = Client()
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def work() -> str:
            started.set()
            try:
                await asyncio.Event().wait()  # forever
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "never"

        async def leave() -> None:
            await started.wait()
            client.gone.set()

        leaving = asyncio.ensure_future(leave())
        assert await until_disconnected(client.receive, work()) is None
        assert cancelled.is_set()
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.01)  # no cancel is left pending for a later await
        await leaving

    asyncio.run(scenario())


def test_a_cancel_from_elsewhere_is_not_taken_for_the_client_leaving() -> None:
    async def scenario() -> None:
        client = Client()

        async def work() -> None:
            await asyncio.Event().wait()

        async def caller() -> None:
            await until_disconnected(client.receive, work())

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.01)
        client.gone.set()  # the client leaves and a shutdown cancels, in the same turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_timeout_around_it_is_still_a_timeout() -> None:
    async def scenario() -> None:
        client = Client()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await until_disconnected(client.receive, asyncio.Event().wait())

    asyncio.run(scenario())


def test_work_that_swallows_the_cancel_leaves_no_cancel_pending() -> None:
    async def scenario() -> None:
        client = Client()

        async def stubborn() -> str:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return "kept going"
            return "never"

        async def leave() -> None:
            await asyncio.sleep(0.01)
            client.gone.set()

        leaving = asyncio.ensure_future(leave())
        assert await until_disconnected(client.receive, stubborn()) == "kept going"
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.01)  # would raise CancelledError if a cancel were left behind
        await leaving

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deeper than this server reads"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "more than 4,300 digits"),
        (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "string at messages[0].content holds a lone"),
        (b'{"model": "\\uDFFF"}', "string at model holds a lone UTF-16 surrogate"),
        (b'{"x\\ud800": 1}', "string at body (a key) holds a lone"),
        (b'{"a": "\\ud83d\\ud83d"}', "lone UTF-16 surrogate"),  # two highs are no pair
        (b'{"model": "m", "messages": [', "is not valid JSON"),
        (b'{"model": "\xff"}', "is not valid JSON"),
    ],
)
def test_what_json_cannot_read_is_a_400_saying_why(raw: bytes, words: str) -> None:
    """Each was a 500 (RecursionError, ValueError) or, for the surrogate, text that broke the runner's tokenizer
    and the usage log downstream."""
    with pytest.raises(InvalidArgument, match="request body") as caught:
        json_object(raw)
    assert words in caught.value.message


def test_escaped_pairs_and_other_escapes_read_as_ever() -> None:
    assert client_json(b'{"e": "\\ud83d\\ude00", "s": "a\\/b\\n"}') == {"e": "\U0001f600", "s": "a/b\n"}
    assert client_json('{"e": "\\uD83D\\uDE00"}') == {"e": "\U0001f600"}  # text, as a batch line is read
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        client_json('{"e": ["ok", {"deep": "\\udc00"}]}')
