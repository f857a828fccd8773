"""The floor under ``gateway_overhead.py --floor``: what uvicorn alone adds in front of a runner on this machine.

A raw ASGI app under uvicorn with the gateway's settings (uvloop and httptools where installed, no access log)
that relays each POST's body to the runner's Unix socket over one keep-alive connection and hands back its
answer: no validation, keys, limits, routing, leases, metering, metrics or log line. Answers with a
``content-length`` only (not streamed), which is what the latency measurement sends.

    python benchmarks/floor_relay.py --socket RUNNER.sock --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn


class Relay:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def exchange(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        async with self.lock:  # one request at a time on the one connection
            if self.reader is None or self.writer is None:
                self.reader, self.writer = await asyncio.open_unix_connection(self.socket_path)
            head = b"POST %s HTTP/1.1\r\nhost: runner\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            self.writer.write(head % (path, len(body)) + body)
            answer_head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(answer_head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in answer_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return status, await self.reader.readexactly(length)


def make_app(relay: Relay) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = await relay.exchange(scope["raw_path"], body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        make_app(Relay(args.socket)), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
