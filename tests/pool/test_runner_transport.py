"""RunnerTransport against scripted HTTP/1.1 servers on a Unix socket: keep-alive, streaming, early
close, stale connections, broken and malformed answers, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest

from memserve.pool.runner_transport import RunnerTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Server:
    """A Unix-socket server running ``handler`` per connection; counts connections, keeps requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.disconnected = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        """One request into ``requests``; False at EOF."""
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head:
            return False
        line, *rest = head.rstrip(b"\r\n").split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in rest)}
        body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        self.requests.append((line, headers, body))
        return True


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, handler: Handler) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    server = Server(handler)
    path = str(tmp_path / "r.sock")
    listener = await asyncio.start_unix_server(server._serve, path)
    client = httpx.AsyncClient(
        base_url="http://runner", transport=RunnerTransport(path), timeout=httpx.Timeout(None, connect=5.0)
    )
    try:
        yield server, client
    finally:
        await client.aclose()
        listener.close()


def answer(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await server.read_request(reader):
        line, _, body = server.requests[-1]
        writer.write(answer(b'{"line":"' + line + b'","body":' + (body or b"null") + b"}"))
        await writer.drain()


@in_loop
async def test_requests_and_bodies_arrive_whole_and_one_connection_is_reused(tmp_path: Path) -> None:
    async with serving(tmp_path, echo_forever) as (server, client):
        first = await client.post("/v1/x?a=1", content=b'{"k": [1, 2]}', headers={"X-Test": "yes"})
        second = await client.get("/health")
        third = await client.post("/v1/x", json={"n": 3})
    assert first.status_code == 200
    assert first.json() == {"line": "POST /v1/x?a=1 HTTP/1.1", "body": {"k": [1, 2]}}
    assert second.json() == {"line": "GET /health HTTP/1.1", "body": None}
    assert third.json()["body"] == {"n": 3}
    assert server.connections == 1  # keep-alive: every request on the same connection
    _, headers, _ = server.requests[0]
    assert headers[b"x-test"] == b"yes"
    assert headers[b"content-length"] == b"13"
    assert headers[b"host"] == b"runner"
    assert b"content-length" not in server.requests[1][1]  # a GET without a body sends no length


@in_loop
async def test_a_stream_is_handed_over_as_it_arrives(tmp_path: Path) -> None:
    go_on = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunk(b"data: 1\n\n"))
        await writer.drain()
        await go_on.wait()  # the client must see the first event before the second exists
        writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await server.read_request(reader)  # the connection stays open for the next request

    async with (
        serving(tmp_path, stream) as (_, client),
        client.stream("POST", "/v1/chat/completions", content=b"{}") as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        parts = response.aiter_bytes()
        assert await anext(parts) == b"data: 1\n\n"
        go_on.set()
        rest = b"".join([part async for part in parts])
    assert rest == b"data: 2\n\ndata: [DONE]\n\n"


@in_loop
async def test_closing_a_stream_early_closes_its_connection(tmp_path: Path) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        if server.connections > 1:
            await echo_forever(reader, writer, server)
            return
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(chunk(b"data: x\n\n"))
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            server.disconnected.set()

    async with serving(tmp_path, endless) as (server, client):
        async with client.stream("POST", "/v1/chat/completions", content=b"{}") as response:
            async for _ in response.aiter_bytes():
                break
        await asyncio.wait_for(server.disconnected.wait(), 5)
        again = await client.post("/v1/completions", content=b"{}")
        assert again.json() == {"line": "POST /v1/completions HTTP/1.1", "body": {}}
    assert server.connections == 2  # the early-closed connection was not reused


@in_loop
async def test_a_connection_the_server_dropped_while_idle_is_replaced(tmp_path: Path) -> None:
    async def one_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(answer(b'{"n":%d}' % server.connections))  # keep-alive answer, then gone
        await writer.drain()

    async with serving(tmp_path, one_and_close) as (server, client):
        assert (await client.get("/a")).json() == {"n": 1}
        await asyncio.sleep(0.05)
        assert (await client.get("/b")).json() == {"n": 2}
    assert server.connections == 2


@in_loop
async def test_a_reused_connection_closed_unanswered_is_an_error_never_a_second_send(tmp_path: Path) -> None:
    """The runner read the request and died before answering: say so, and never send it again."""

    async def die_on_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(answer(b"{}"))
        await writer.drain()
        await server.read_request(reader)  # the second request arrives, and is dropped unanswered

    async with serving(tmp_path, die_on_second) as (server, client):
        await client.get("/a")
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response") as caught:
            await client.post("/v1/completions", content=b"{}")
    assert caught.value.request.url.path == "/v1/completions"
    assert (server.connections, len(server.requests)) == (1, 2)


@in_loop
async def test_connections_idle_too_long_are_not_reused(tmp_path: Path) -> None:
    """uvicorn drops a connection idle for 5 s; ours stop being reused before that (4 s by default)."""
    path = str(tmp_path / "r.sock")
    server = Server(echo_forever)
    listener = await asyncio.start_unix_server(server._serve, path)
    async with httpx.AsyncClient(
        base_url="http://runner", transport=RunnerTransport(path, max_idle_seconds=1.0)
    ) as client:
        await client.get("/a")
        await client.get("/b")  # at once: the same connection
        await asyncio.sleep(1.2)
        await client.get("/c")  # idle past the limit: a new one
    listener.close()
    assert server.connections == 2


@in_loop
async def test_head_interim_and_close_delimited_answers(tmp_path: Path) -> None:
    async def varied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)  # HEAD: a length, and no body after it
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        await server.read_request(reader)  # an interim 100 Continue, then the answer
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(answer(b'{"n":2}'))
        await server.read_request(reader)  # neither a length nor chunked: the body ends with the connection
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe whole ")
        await writer.drain()
        writer.write(b"body")
        await writer.drain()

    async with serving(tmp_path, varied) as (server, client):
        head = await client.head("/health")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "5")
        assert (await client.post("/v1/x", content=b"{}")).json() == {"n": 2}
        assert (await client.get("/plain")).content == b"the whole body"
    assert server.connections == 1


@in_loop
async def test_a_fresh_connection_closed_unanswered_is_a_protocol_error(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)

    async with serving(tmp_path, hang_up) as (server, client):
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.post("/v1/completions", content=b"{}")
    assert server.connections == 1  # a fresh connection is never retried: the server saw the request


@in_loop
async def test_a_stream_that_breaks_off_raises_at_the_break(tmp_path: Path) -> None:
    async def die_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await writer.drain()

    async with serving(tmp_path, die_midway) as (_, client):
        received = b""
        async with client.stream("POST", "/v1/chat/completions", content=b"{}") as response:
            with pytest.raises(httpx.RemoteProtocolError, match="before the end of its answer"):
                async for part in response.aiter_bytes():
                    received += part
    assert received == b"data: 1\n\n"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"SMTP ready\r\n\r\n", "malformed HTTP"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            "switched protocols",
        ),
    ],
)
@in_loop
async def test_an_answer_that_is_not_plain_http_is_a_protocol_error(tmp_path: Path, reply: bytes, message: str) -> None:
    async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()

    async with serving(tmp_path, odd) as (_, client):
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await client.get("/health")


@in_loop
async def test_no_socket_is_a_connect_error(tmp_path: Path) -> None:
    client = httpx.AsyncClient(transport=RunnerTransport(str(tmp_path / "missing.sock")))
    with pytest.raises(httpx.ConnectError, match=r"missing\.sock"):
        await client.get("http://runner/health")
    await client.aclose()


@in_loop
async def test_a_silent_server_is_a_read_timeout(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await reader.read()

    async with serving(tmp_path, silent) as (_, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/health", timeout=0.2)


@in_loop
async def test_a_large_body_survives_a_slow_reader(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB, past the high-water mark: reading pauses and resumes

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for start in range(0, len(payload), 65536):
            writer.write(chunk(payload[start : start + 65536]))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(tmp_path, big) as (_, client):
        received = bytearray()
        async with client.stream("GET", "/big") as response:
            async for part in response.aiter_raw():
                received += part
                await asyncio.sleep(0.01)
    assert bytes(received) == payload


@in_loop
async def test_a_closed_transport_refuses_requests(tmp_path: Path) -> None:
    transport = RunnerTransport(str(tmp_path / "r.sock"))
    await transport.aclose()
    with pytest.raises(httpx.ConnectError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", "http://runner/health"))
