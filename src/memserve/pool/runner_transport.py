"""An httpx transport for a runner's Unix socket (or a loopback port): asyncio protocol, the httptools parser,
keep-alive.

Every token the gateway relays crosses this hop. httpx's default transport (httpcore) parses HTTP/1.1
in pure Python (h11) and opens an anyio cancel scope for every read; on two cores a py-spy of the
gateway relaying a tiny model's tokens spent most of its time there. This transport plugs into the
same ``httpx.AsyncClient`` (its documented extension point) and does the work the way uvicorn does on
the server side: bytes arrive in ``data_received`` and go straight into httptools' C parser (llhttp).

- A streamed body is handed over as it is parsed, everything buffered since the last read as one
  chunk, so events that arrive together leave together (one write to the client instead of several).
- Connections are kept alive and reused while they have been idle less than ``max_idle_seconds``
  (counted from the end of the last answer, so always more than the server's own count): uvicorn drops
  idle connections after 5 s, and a request must never be sent on one it is about to drop. A request is
  never sent twice: a connection that closes before answering is an error, as with httpcore.
- Errors are httpx's own exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
  ``RemoteProtocolError``, ``ReadError``), so callers handle them as with any other transport.
- Closing a response before its end closes its connection: the runner sees its client go away and
  frees the sequence at once.
- A reader that falls behind pauses the socket (``pause_reading``) past ``_HIGH_WATER_BYTES``.

The same transport speaks to an external engine's server (vLLM, llama-server: ``pool/external.py``) on
``127.0.0.1:PORT``: only the connect differs, so the gateway's hot path is the same for every runner kind.

Only what a runner speaks is supported: HTTP/1.1 over a Unix socket or TCP, request bodies sent whole; 1xx
interim answers are skipped, HEAD answers have no body, an answer with neither a length nor chunked
encoding ends when the connection does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httptools
import httpx

__all__ = ["RunnerTransport"]

_HIGH_WATER_BYTES = 1 << 20
"""A streamed body buffered beyond this pauses reading from the socket until the reader catches up."""

_MAX_IDLE = 32
"""Idle keep-alive connections kept per runner; more than that are closed when released."""

MAX_IDLE_SECONDS = 4.0
"""Reuse a connection only while it has been idle less than this: below uvicorn's keep-alive (5 s)."""

_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class RunnerTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one Unix socket, or to one ``(host, port)``; honours the request's ``connect`` and ``read``
    timeouts. The URL's host and port are not used to connect: the runner is the one the transport names."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        address: tuple[str, int] | None = None,
        max_idle_seconds: float = MAX_IDLE_SECONDS,
    ) -> None:
        if (socket_path is None) == (address is None):
            raise ValueError("a RunnerTransport needs either a socket path or a (host, port) address")
        self.socket_path = socket_path
        self.address = address
        self.where = socket_path if address is None else f"{address[0]}:{address[1]}"
        self.max_idle_seconds = max_idle_seconds
        self._idle: list[_Connection] = []
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._handle(request)
        except httpx.RequestError as exc:  # as httpx's own transports do: the error names its request
            exc.request = request
            raise

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError(f"the transport for {self.where} is closed")
        timeouts = request.extensions.get("timeout", {})
        message = _encode_request(request, await request.aread())
        connection = self._take_idle() or await self._connect(timeouts.get("connect"))
        try:
            connection.send(message, head_only=request.method == "HEAD")
            await connection.wait_for_head(timeouts.get("read"))
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
        oldest = time.monotonic() - self.max_idle_seconds
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and connection.completed_at > oldest:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable or len(self._idle) >= _MAX_IDLE:
            connection.close()
        else:
            self._idle.append(connection)

    async def _connect(self, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self.address is None:
                    _, connection = await loop.create_unix_connection(_Connection, self.socket_path)
                else:  # asyncio sets TCP_NODELAY on its TCP transports: each token leaves at once
                    _, connection = await loop.create_connection(_Connection, *self.address)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {self.where} within {timeout} s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.where}: {exc.strerror or exc}") from exc
        return connection


def _encode_request(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body; the body always goes whole, with its length."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines += [name + b": " + value for name, value in request.headers.raw if name.lower() not in _DROPPED_HEADERS]
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


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
        self.completed_at = 0.0  # time.monotonic() when the last answer ended
        self.keep_alive = False
        self.head_only = False  # the request was HEAD: the answer has no body, whatever its headers say
        self.until_close = False  # neither a length nor chunked: the body ends with the connection
        self.interim = False  # a 1xx answer is being parsed; the real one follows
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

    def send(self, message: bytes, *, head_only: bool = False) -> None:
        """Start a new exchange: a fresh parser and state, then the request's bytes."""
        if not self.usable:
            raise httpx.RemoteProtocolError("the server closed the connection before the request was sent")
        self.parser = httptools.HttpResponseParser(self)
        self.status_code, self.headers, self.chunks, self.buffered = 0, [], [], 0
        self.head_complete = self.complete = self.keep_alive = self.until_close = self.interim = False
        self.head_only = head_only
        self.error = None
        assert self.transport is not None
        self.transport.write(message)

    async def wait_for_head(self, timeout: float | None) -> None:
        while not self.head_complete:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise httpx.RemoteProtocolError("the server disconnected without sending a response")
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
        self.transport = transport  # type: ignore[assignment]  # a socket's transport is an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.error is None:
                self.error = httpx.RemoteProtocolError(f"the server sent malformed HTTP: {exc!r}")
            self.close()
        if self.buffered > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_complete and not self.complete and self.until_close and exc is None:
            self.complete = True  # the connection's end is the body's end
        elif self.head_complete and not self.complete and self.error is None:
            reason = f": {exc}" if exc is not None else ""
            self.error = httpx.RemoteProtocolError(
                f"the server closed the connection before the end of its answer{reason}"
            )
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes | None) -> None:
        self.headers.append((name, value or b""))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:  # nothing here asks for an upgrade
            self.error = httpx.RemoteProtocolError("the server switched protocols (101); a runner speaks HTTP/1.1")
            return
        if 100 <= status < 200:  # 100 Continue and the like: the real answer follows
            self.interim, self.headers = True, []
            return
        self.status_code = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_complete = True
        names = {name.lower() for name, _ in self.headers}
        if self.head_only or status in (204, 304):
            self._complete()
        elif b"content-length" not in names and b"transfer-encoding" not in names:
            self.until_close, self.keep_alive = True, False

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self._complete()

    def _complete(self) -> None:
        self.complete = True
        self.completed_at = time.monotonic()


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
