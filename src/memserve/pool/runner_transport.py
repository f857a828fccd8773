"""An httpx transport for a runner's Unix socket: asyncio protocol, the httptools parser, keep-alive.

Every token the gateway relays crosses this hop. httpx's default transport (httpcore) parses HTTP/1.1
in pure Python (h11) and opens an anyio cancel scope for every read; on two cores a py-spy of the
gateway relaying a tiny model's tokens spent most of its time there. This transport plugs into the
same ``httpx.AsyncClient`` (its documented extension point) and does the work the way uvicorn does on
the server side: bytes arrive in ``data_received`` and go straight into httptools' C parser (llhttp).

- A streamed body is handed over as it is parsed, everything buffered since the last read as one
  chunk, so events that arrive together leave together (one write to the client instead of several).
- Connections are kept alive and reused; a reused one that the runner closed meanwhile (uvicorn drops
  idle connections after a few seconds) is retried once on a new one, as long as it sent nothing back.
- Errors are httpx's own exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
  ``RemoteProtocolError``, ``ReadError``), so callers handle them as with any other transport.
- Closing a response before its end closes its connection: the runner sees its client go away and
  frees the sequence at once.
- A reader that falls behind pauses the socket (``pause_reading``) past ``_HIGH_WATER_BYTES``.

Only what a runner speaks is supported: HTTP/1.1 over a Unix socket, request bodies sent whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httptools
import httpx

__all__ = ["RunnerTransport"]

_HIGH_WATER_BYTES = 1 << 20
"""A streamed body buffered beyond this pauses reading from the socket until the reader catches up."""

_MAX_IDLE = 32
"""Idle keep-alive connections kept per runner; more than that are closed when released."""

_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class RunnerTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one Unix socket; honours the request's ``connect`` and ``read`` timeouts."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._idle: list[_Connection] = []
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError(f"the transport for {self.socket_path} is closed", request=request)
        timeouts = request.extensions.get("timeout", {})
        message = _encode_request(request, await request.aread())
        while True:
            connection = self._take_idle()
            reused = connection is not None
            if connection is None:
                connection = await self._connect(request, timeouts.get("connect"))
            try:
                connection.send(message)
                await connection.wait_for_head(timeouts.get("read"))
            except _ClosedBeforeAnswer:
                connection.close()
                if reused:  # the runner dropped it while it sat idle: a new one gets the request
                    continue
                raise httpx.RemoteProtocolError("the server disconnected without sending a response",
                                                request=request) from None
            except BaseException:
                connection.close()
                raise
            return httpx.Response(
                connection.status_code,
                headers=connection.headers,
                stream=_Body(self, connection, timeouts.get("read")),
                extensions={"http_version": b"HTTP/1.1"},
                request=request,
            )

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable or len(self._idle) >= _MAX_IDLE:
            connection.close()
        else:
            self._idle.append(connection)

    async def _connect(self, request: httpx.Request, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_unix_connection(_Connection, self.socket_path)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {self.socket_path} within {timeout} s",
                                       request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.socket_path}: {exc.strerror or exc}",
                                     request=request) from exc
        return connection


def _encode_request(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body; the body always goes whole, with its length."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines += [name + b": " + value for name, value in request.headers.raw if name.lower() not in _DROPPED_HEADERS]
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _ClosedBeforeAnswer(Exception):
    """The connection closed before a single byte of the answer arrived."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the protocol, the parser's callbacks and the waiting, on the loop."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.head_complete = False
        self.complete = False
        self.keep_alive = False
        self.answered = False  # any byte of the current answer arrived
        self.error: httpx.TransportError | None = None
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- for the transport and the body ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.chunks and self.usable

    def send(self, message: bytes) -> None:
        """Start a new exchange: a fresh parser and state, then the request's bytes."""
        if not self.usable:
            raise _ClosedBeforeAnswer
        self.parser = httptools.HttpResponseParser(self)
        self.status_code, self.headers, self.chunks, self.buffered = 0, [], [], 0
        self.head_complete = self.complete = self.keep_alive = self.answered = False
        self.error = None
        assert self.transport is not None
        self.transport.write(message)

    async def wait_for_head(self, timeout: float | None) -> None:
        while not self.head_complete:
            if self.error is not None:
                raise self.error
            if self.closed:
                if not self.answered:
                    raise _ClosedBeforeAnswer
                raise httpx.RemoteProtocolError("the server closed the connection in the middle of its headers")
            await self.wait(timeout)

    async def wait(self, timeout: float | None) -> None:
        """Until the protocol has news (data, the end, an error); ReadTimeout after ``timeout`` seconds."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            raise httpx.ReadTimeout(f"no data from the server for {timeout} s") from None
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Everything parsed since the last call, as one chunk; resumes a paused socket."""
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.buffered = [], 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a Unix socket's transport is an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"the server sent malformed HTTP: {exc}")
            self.close()
        if self.buffered > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answered and not self.complete and self.error is None:
            reason = f": {exc}" if exc is not None else ""
            self.error = httpx.RemoteProtocolError(
                f"the server closed the connection before the end of its answer{reason}")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes | None) -> None:
        self.headers.append((name, value or b""))

    def on_headers_complete(self) -> None:
        self.status_code = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_complete = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Body(httpx.AsyncByteStream):
    """A response body as it is parsed; gives the connection back once it has been read to the end."""

    def __init__(self, transport: RunnerTransport, connection: _Connection, timeout: float | None) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise connection.error
            elif connection.closed:
                raise httpx.RemoteProtocolError("the server closed the connection before the end of its answer")
            else:
                await connection.wait(self._timeout)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reusable:
            self._transport._release(connection)
        else:  # closed early (the client went away) or broken: the runner must see it at once
            with contextlib.suppress(Exception):
                connection.close()
